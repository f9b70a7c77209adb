"""Triton kernels and their torch reference twins (installed as ``megadistill.kernels``)."""
