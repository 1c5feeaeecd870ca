"""Conditions that guide the diffusion model (Lad phase 2).

Betti-number topology, the structure, content-input and spatial conditions, and their augmentation.
"""
