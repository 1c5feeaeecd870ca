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


class FolderInUseError(LadFastError):
    """Another lad-fast process holds the lock of an output or run folder."""


class DiskFullError(LadFastError, OSError):
    """No space left on the device while writing (an ``OSError`` too, so ``except OSError`` still sees it).

    ``str(err)`` is the one-line message alone (not ``[Errno 28] ...``).
    """

    def __init__(self, message: str) -> None:
        import errno

        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message
