"""Tiny models for the toy distillation lab (CPU, seconds to train)."""
