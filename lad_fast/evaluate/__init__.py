"""Evaluation: metrics and SSL downstream checks."""
