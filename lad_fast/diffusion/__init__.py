"""Diffusion: schedules and training objectives, and the pure sampling functions."""
