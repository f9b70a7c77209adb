"""Diffusion math: schedules, parameterisations, guidance, samplers and losses (pure functions)."""
