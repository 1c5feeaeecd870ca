"""Errors raised by lad-fast.

Every message says what was wrong and what to do about it. The CLI prints the message on one line and
exits with code 2 (the traceback shows only with ``LAD_FAST_DEBUG=1``).
"""

from __future__ import annotations


class LadFastError(Exception):
    """Base class of every error lad-fast raises on purpose."""


class InputError(LadFastError):
    """An input file or folder is missing, unreadable or unsuitable."""


class ConfigError(LadFastError):
    """Options or a configuration are invalid or inconsistent."""


class OutputExistsError(LadFastError):
    """An output folder holds files lad-fast did not write; pass --force to overwrite."""


class CheckpointError(LadFastError):
    """A checkpoint or run folder is missing, corrupt or belongs to another model or config."""


class BackendUnavailableError(LadFastError):
    """An optional backend (CUDA, Triton, cupy, ONNX Runtime, TensorRT) is not usable on this machine."""


class TrainingDivergedError(LadFastError):
    """Training produced too many non-finite losses or gradients."""
