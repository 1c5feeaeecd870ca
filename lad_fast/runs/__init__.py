"""Run folders, their checkpoints and loading a trained run; a layer below both training and generation."""
