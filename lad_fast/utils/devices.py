"""Device choice from a CLI string: which device this process uses, and whether it is there."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from lad_fast.errors import ConfigError


def choose_device(
    spec: str | torch.device = "auto",
    env: Mapping[str, str] | None = None,
    *,
    cuda_available: bool | None = None,
) -> str:
    """The device string this process should use for ``spec`` ("auto", "cpu", "cuda" or "cuda:N").

    "auto" is "cuda" when ``cuda_available`` (default: ``torch.cuda.is_available()``), else "cpu".
    Under torchrun (``LOCAL_RANK`` in ``env``, default ``os.environ``) a CUDA device becomes
    ``cuda:LOCAL_RANK``, so rank r of a node takes its own GPU; an explicit ``cuda:N`` that names another
    GPU than LOCAL_RANK is refused (two ranks on one GPU would deadlock nccl). A pure function of its
    arguments, so the choice is testable without GPUs; :func:`resolve_device` checks the result exists.
    """
    env = os.environ if env is None else env
    text = str(spec)
    if text == "auto":
        available = torch.cuda.is_available() if cuda_available is None else cuda_available
        text = "cuda" if available else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda" or "LOCAL_RANK" not in env:
        return str(dev)
    try:
        local_rank = int(env["LOCAL_RANK"])
    except ValueError:
        raise ConfigError(
            f"LOCAL_RANK={env['LOCAL_RANK']!r} is not an integer; launch with torchrun"
        ) from None
    if dev.index is not None and dev.index != local_rank:
        raise ConfigError(
            f"device {text!r} asked for, but torchrun gave this process LOCAL_RANK {local_rank}; pass "
            "--device cuda (or auto) and each rank takes cuda:LOCAL_RANK"
        )
    return f"cuda:{local_rank}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" is CUDA when available, else CPU; a CUDA device that is not there is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no usable CUDA GPU")
    return dev
