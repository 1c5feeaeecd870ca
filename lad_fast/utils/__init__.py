"""Plumbing every layer may use.

Atomic writes, folder locks, interrupts, progress, a background worker, CPU threads, devices, torchrun
and safe paths.
"""
