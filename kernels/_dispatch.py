"""Choosing between a Triton kernel and its PyTorch reference.

``impl="auto"`` picks Triton for CUDA tensors and the reference elsewhere; ``LAD_FAST_KERNELS=torch``
or ``=triton`` forces one for every op. ``impl="triton"`` on CPU tensors works only under the Triton
interpreter (``TRITON_INTERPRET=1``); it is how CI tests the kernels. Triton is imported lazily, so the
package imports without it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager as contextlib_contextmanager

import torch

from lad_fast.errors import BackendUnavailableError, ConfigError

IMPLS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Return "torch" or "triton" for these tensors, raising a clear error if Triton cannot run them."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    forced = os.environ.get("LAD_FAST_KERNELS", "")
    if forced and forced not in ("torch", "triton"):
        raise ConfigError(f"LAD_FAST_KERNELS must be 'torch' or 'triton', got {forced!r}")
    if impl == "auto":
        impl = forced or "auto"
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise BackendUnavailableError("impl='triton' needs the triton package (pip install triton)")
        if not on_cuda and not interpreter_on():
            raise BackendUnavailableError(
                "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before Python starts, or use impl='torch'"
            )
    return impl


@contextlib_contextmanager
def forced_impl(impl: str) -> Iterator[None]:
    """Force every op to ``impl`` inside the block (export uses "torch": standard ONNX ops only)."""
    if impl not in ("torch", "triton"):
        raise ConfigError(f"forced_impl takes 'torch' or 'triton', got {impl!r}")
    old = os.environ.get("LAD_FAST_KERNELS")
    os.environ["LAD_FAST_KERNELS"] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LAD_FAST_KERNELS", None)
        else:
            os.environ["LAD_FAST_KERNELS"] = old
