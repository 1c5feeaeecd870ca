"""Choosing between a Triton kernel and its PyTorch reference.

``impl="auto"`` picks Triton for CUDA tensors and the reference elsewhere; ``LAD_FAST_KERNELS=torch``
or ``=triton`` forces one for every op. ``impl="triton"`` on CPU tensors works only under the Triton
interpreter (``TRITON_INTERPRET=1``); it is how CI tests the kernels. Triton is imported lazily, so the
package imports without it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager as contextlib_contextmanager

import torch

from lad_fast.errors import BackendUnavailableError, ConfigError

IMPLS = ("auto", "torch", "triton")
# Triton is an extra (CUDA builds of torch bring it anyway; the CPU build does not need its 1 GB wheel).
TRITON_INSTALL = 'pip install "lad-fast[triton]"'


# Whether triton is installed, decided once at import by looking for the package without importing it
# (importing triton is slow and, on CPU, must wait until TRITON_INTERPRET is set). A plain module
# constant, unlike a functools.cache, is something torch.compile traces without a warning or a guard
# on a cache wrapper.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


# Set only inside ``meta_as_cuda()``: kernels/aot.py records which ops a model launches on meta tensors.
_META_AS_CUDA = False


def triton_available() -> bool:
    """True when the triton package is installed (found at import of this module, not imported)."""
    return _TRITON_FOUND


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
    on_cuda = all(t.is_cuda or (_META_AS_CUDA and t.is_meta) for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise BackendUnavailableError(
                "impl='triton' (or LAD_FAST_KERNELS=triton) needs the triton package, an optional extra: "
                f"{TRITON_INSTALL}; or use impl='torch'"
            )
        if not on_cuda and not interpreter_on():
            raise BackendUnavailableError(
                "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before Python starts, or use impl='torch'"
            )
    return impl


def autocast_inputs(
    *tensors: torch.Tensor | None, dtype: torch.dtype | None = None
) -> list[torch.Tensor | None]:
    """Cast the floating tensors as autocast would, when autocast is on for their device type.

    ``dtype=None`` casts to the autocast dtype (the rule of ``F.conv3d`` and SDPA); ``dtype=float32``
    is the rule of fp32 ops such as ``cdist``; float64 tensors stay as they are, as under autocast.
    Custom ops get no autocast rule of their own, so the public functions apply it before their dtype
    checks: without it an fp32 weight beside fp16 activations would be a dtype mismatch. Returns the
    tensors in order (None stays None).
    """
    device = next(t for t in tensors if t is not None).device.type
    # Devices without autocast (meta: the AOT check's shape-only runs) get the tensors as they are.
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = dtype or torch.get_autocast_dtype(device)
    # Autocast's own eligibility rule: floating tensors other than float64.
    return [
        t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)
        for t in tensors
    ]


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


@contextlib_contextmanager
def meta_as_cuda() -> Iterator[None]:
    """Inside the block ``impl="auto"`` treats meta tensors as CUDA tensors: a model run on meta tensors
    (shapes only, no data, no GPU) calls the Triton ops a GPU run calls, with the same arguments. The
    ops' fake implementations serve meta tensors; kernels/aot.py records the calls with a dispatch hook."""
    global _META_AS_CUDA
    old, _META_AS_CUDA = _META_AS_CUDA, True
    try:
        yield
    finally:
        _META_AS_CUDA = old
