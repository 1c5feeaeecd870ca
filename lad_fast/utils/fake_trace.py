"""What a piece of torch code costs, measured by running it on fake tensors: peak memory, FLOPs, bytes.

Fake tensors (``FakeTensorMode``, :func:`fake_mode`) have a shape, a dtype, a layout and a device but
no data: every op computes only its output's metadata (lad-fast's custom ops run their registered fake
implementations), so nothing is allocated and a training step of the ``lad`` models costs seconds of
Python. Plans use fake *CPU* tensors: on a CPU build of torch, autograd and autocast abort the process
on fake CUDA tensors ("PyTorch is not linked with support for cuda devices"), and bare meta tensors
cannot enter ``torch.autocast(device_type="meta")``, which the VQ-GAN's quantiser opens. What makes a
trace a CUDA one is the kernel path (:func:`lad_fast.generate.plan.gpu_kernel_path`); shapes, dtypes
and bytes do not depend on the device.

:class:`TensorTracker` is a ``TorchDispatchMode`` that sees every aten (and custom) op below autograd.
For each op it

- adds the bytes of every tensor storage it has not seen before to the live total; a weak reference
  to the storage takes them off again when it is freed. The total is the sum of live tensor storages:
  what the CUDA caching allocator reports as ``memory_allocated`` before its 512-byte rounding, and the
  peak is ``max_memory_allocated``. Storages are tagged with a category (the caller's current
  :meth:`TensorTracker.category`, or one given to :meth:`TensorTracker.track` /
  :meth:`TensorTracker.retag`), so the peak comes with its breakdown, overall and within each category
  block (:attr:`Trace.block_peaks`); casts to the autocast dtype of a block are "autocast copies";
- counts FLOPs with ``torch.utils.flop_counter``'s formulas (matrix products, convolutions, attention;
  2 per multiply-add) plus :data:`CUSTOM_FLOPS`, formulas for lad-fast's own custom ops, which the
  flop counter does not know;
- counts the bytes it reads and writes (its tensor inputs and outputs; views move none), the memory
  traffic of eager execution, and keeps ``(flops, bytes)`` per op for a roofline time
  (:func:`lad_fast.utils.gpu_specs.roofline_seconds`).

Ops whose output depends on tensor values cannot run on fake tensors; the tracker gives them their
largest outcome (:meth:`TensorTracker._assume`): every mask element true (``nonzero``, boolean
indexing, ``masked_select``), ``bincount`` of ``minlength`` bins, a value test (``if t.any():``) true and
``.item()`` 1. The same tracker on real tensors measures a real run, which is how a plan is checked.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CUSTOM_FLOPS", "TensorTracker", "Trace", "conv_flops", "fake_mode"]

aten = torch.ops.aten


def conv_flops(x_shape: Iterable[int], w_shape: Iterable[int], out_shape: Iterable[int]) -> int:
    """FLOPs of a convolution: 2 * N * O * prod(output spatial) * C * prod(kernel) (dense, groups 1).

    x (N, C, *spatial), weight (O, C, *kernel), out (N, O, *spatial'); a transposed convolution costs
    the same with x and out exchanged, which the caller does."""
    x_shape, w_shape, out_shape = list(x_shape), list(w_shape), list(out_shape)
    return 2 * x_shape[0] * math.prod(w_shape) * math.prod(out_shape[2:])


def _conv(args: tuple, out: Any) -> int:
    x, w = args[0], args[1]
    return conv_flops(x.shape, w.shape, out.shape)


def _attention_fwd(args: tuple, out: Any) -> int:
    b, h, seq, d = args[0].shape
    return 4 * b * h * seq * seq * d  # q k^T and p v


def _attention_bwd(args: tuple, out: Any) -> int:
    b, h, seq, d = args[1].shape
    return 8 * b * h * seq * seq * d  # dv, dp, dq, dk (the flash recompute of q k^T is not counted)


def _norm_act_bwd(args: tuple, out: Any) -> int:
    grad, x, _, _, w = args[:5]
    needs = args[9]
    return conv_flops(x.shape, w.shape, grad.shape) * (int(needs[0]) + int(needs[3]))


def _conv3d_bwd(args: tuple, out: Any) -> int:
    grad, x, w = args[:3]
    needs = args[5]
    return conv_flops(x.shape, w.shape, grad.shape) * (int(needs[0]) + int(needs[1]))


def _vq_nearest(args: tuple, out: Any) -> int:
    n, d = args[0].shape
    return 2 * n * args[1].shape[0] * d  # the distance matrix's z c^T


# Formulas for lad-fast's custom ops (``torch.library.custom_op`` names) and the aten ops the flop counter
# misses, counted as torch.utils.flop_counter counts: matrix and convolution FLOPs, 2 per multiply-add.
CUSTOM_FLOPS: dict[str, Callable[[tuple, Any], int]] = {
    "lad_fast::conv3d": _conv,
    "lad_fast::norm_act_conv3d": lambda args, out: conv_flops(args[0].shape, args[4].shape, out.shape),
    "lad_fast::conv3d_bwd": _conv3d_bwd,
    "lad_fast::norm_act_conv3d_bwd": _norm_act_bwd,
    "lad_fast::attention_fwd": _attention_fwd,
    "lad_fast::attention_bwd": _attention_bwd,
    "lad_fast::vq_nearest": _vq_nearest,
    # the CPU's SDPA kernel, which torch.utils.flop_counter does not list (its CUDA ones it does)
    "aten::_scaled_dot_product_flash_attention_for_cpu": _attention_fwd,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": _attention_bwd,
}

# Factories that allocate without writing: they move no bytes.
_NO_TRAFFIC = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided}


def fake_mode() -> Any:
    """A ``FakeTensorMode``: tensors made inside have shapes, dtypes and devices but no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@dataclass
class Trace:
    """What :class:`TensorTracker` saw. peak: the highest sum of live tensor storage bytes; peak_by: that
    sum by category at that moment; block_peaks: ``{block: (peak, by category)}``, the same within each
    :meth:`TensorTracker.category` block (how the peak would move with the batch depends on the block
    it falls in); flops, bytes_moved: totals over the ops; costs: ``(flops, bytes)`` per op, in order;
    ops: calls per op name; assumed: data-dependent ops given their largest outcome."""

    peak: int = 0
    peak_by: dict[str, int] = field(default_factory=dict)
    block_peaks: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    flops: int = 0
    bytes_moved: int = 0
    costs: list[tuple[int, int]] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    assumed: Counter[str] = field(default_factory=Counter)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TensorTracker(TorchDispatchMode):
    """Live tensor bytes (current and peak, by category), FLOPs and bytes moved of the ops run inside.

    Usage: ``tracker.track(existing_tensors, "weights")`` for what exists before; then
    ``with tracker, tracker.category("activations"): ...``; ``tracker.trace`` holds the result. Enter it
    inside ``FakeTensorMode`` for a plan, or on real tensors to measure. Only weak references are kept:
    the tracker never extends a tensor's life.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trace = Trace()
        self.live = 0
        self._by: Counter[str] = Counter()
        self._storages: dict[int, tuple[weakref.ref, int, str]] = {}
        self._category = "other"
        self._autocast: torch.dtype | None = None
        self._autocast_copy = False
        self._flop_registry = _aten_flop_registry()

    # ------------------------------------------------------------------ categories

    @contextlib.contextmanager
    def category(self, name: str, autocast: torch.dtype | None = None) -> Iterator[None]:
        """Storages first seen inside the block are counted under ``name``; with ``autocast`` (the dtype of
        an autocast region the block runs in), casts to that dtype under "autocast copies". (Autocast
        is not visible from inside the dispatch, so the caller says.)"""
        old = self._category, self._autocast
        self._category, self._autocast = name, autocast
        try:
            yield
        finally:
            self._category, self._autocast = old

    def track(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count these (already allocated) tensors as live, under ``category``."""
        for t in tensors:
            self._see(t, category)

    def retag(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Move tracked storages to ``category`` (gradients are made by backward ops, then kept)."""
        for t in tensors:
            key = t.untyped_storage()._cdata
            entry = self._storages.get(key)
            if entry is None:
                self._see(t, category)
                continue
            ref, size, old = entry
            self._by[old] -= size
            self._by[category] += size
            self._storages[key] = (ref, size, category)

    def _see(self, t: torch.Tensor, category: str | None = None) -> None:
        if t.device.type == "meta":  # no memory
            return
        st = t.untyped_storage()
        key = st._cdata
        size = st.nbytes()
        entry = self._storages.get(key)
        if entry is not None:
            ref, old_size, cat = entry
            if size != old_size:  # resized in place (out= ops)
                self._add(cat, size - old_size)
                self._storages[key] = (ref, size, cat)
            return
        cat = category or self._category
        if category is None and self._autocast_copy:
            cat = "autocast copies"
        ref = weakref.ref(st, lambda _, key=key: self._free(key))
        self._storages[key] = (ref, size, cat)
        self._add(cat, size)

    def _add(self, cat: str, size: int) -> None:
        self.live += size
        self._by[cat] += size
        if size <= 0:
            return
        trace = self.trace
        if self.live > trace.peak:
            trace.peak = self.live
            trace.peak_by = {k: v for k, v in self._by.items() if v}
        block = trace.block_peaks.get(self._category)
        if block is None or self.live > block[0]:
            trace.block_peaks[self._category] = (self.live, {k: v for k, v in self._by.items() if v})

    def _free(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            _, size, cat = entry
            self.live -= size
            self._by[cat] -= size

    # ------------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.prim.device:  # a device query: no op to account
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            out = self._assume(func, args, kwargs)
            self.trace.assumed[func.overloadpacket.__name__] += 1
        outputs = _tensors(out)
        self._autocast_copy = (
            self._autocast is not None
            and func.overloadpacket is aten._to_copy
            and all(t.dtype == self._autocast for t in outputs)
        )
        for t in outputs:
            self._see(t)
        self._autocast_copy = False
        name = func._schema.name
        self.trace.ops[name] += 1
        flops = self._flops(func, name, args, kwargs, out)
        moved = 0
        if not func.is_view and func.overloadpacket not in _NO_TRAFFIC:
            moved = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        self.trace.flops += flops
        self.trace.bytes_moved += moved
        if flops or moved:
            self.trace.costs.append((flops, moved))
        return out

    def _flops(self, func, name: str, args: tuple, kwargs: dict, out: Any) -> int:
        custom = CUSTOM_FLOPS.get(name)
        if custom is not None:
            return int(custom(args, out))
        formula = self._flop_registry.get(func.overloadpacket)
        if formula is None:
            return 0
        return int(formula(*args, **kwargs, out_val=out))

    def _assume(self, func, args: tuple, kwargs: dict) -> Any:
        """The largest outcome of an op whose result depends on tensor values (see the module doc)."""
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            x = args[0]
            return True if x.dtype == torch.bool else (1 if not x.is_floating_point() else 1.0)
        if packet is aten.is_nonzero:
            return True
        if packet is aten.nonzero:
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        if packet is aten.bincount:
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            if minlength > 0:
                weights = kwargs.get("weights", args[1] if len(args) > 1 else None)
                dtype = torch.long if weights is None else torch.double
                return torch.zeros(minlength, dtype=dtype, device=args[0].device)
        if packet is aten.masked_select:
            x, mask = args[0], args[1]
            n = torch.broadcast_shapes(x.shape, mask.shape).numel()
            return torch.empty(n, dtype=x.dtype, device=x.device)
        if packet is aten.index:
            # boolean masks -> the long indices of an all-true mask, one per masked dimension
            def expand(i: Any) -> Any:
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    return [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim()
                return [i]

            indices = [j for i in args[1] for j in expand(i)]
            return func(args[0], indices)
        raise NotImplementedError(
            f"planning cannot run {func} on fake tensors (its result depends on tensor values); give it an "
            "assumption in TensorTracker._assume (lad_fast/utils/fake_trace.py)"
        )


def _aten_flop_registry() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry

    return dict(flop_registry)
