"""The GPUs a plan is made for, and a roofline time from FLOPs and bytes per op.

Numbers are the vendors' data-sheet figures (dense, no sparsity): peak bf16 tensor-core rate with fp32
accumulation, peak memory bandwidth, and the memory ``torch.cuda.get_device_properties`` reports.
They are what a plan assumes until a run on the GPU measures it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lad_fast.errors import ConfigError

GiB = 2**30
# A plan fits when its peak stays under this fraction of the GPU's memory: the rest is the CUDA context,
# cuBLAS / cuDNN / Triton workspaces and the caching allocator's fragmentation.
FIT_FRACTION = 0.9
# The predicted time of an op is its roofline at these fractions of the peaks (eager PyTorch at these
# sizes: convolutions and attention reach about this share of the tensor cores, elementwise ops of the
# bandwidth).
MATH_EFFICIENCY = 0.4
BANDWIDTH_EFFICIENCY = 0.7


@dataclass(frozen=True)
class GPU:
    """name; memory in bytes; bf16: peak dense bf16 FLOP/s (None: unknown, no time predicted);
    bandwidth: peak memory bytes/s."""

    name: str
    memory: int
    bf16: float | None = None
    bandwidth: float | None = None

    @property
    def usable(self) -> int:
        """Bytes a plan may fill (:data:`FIT_FRACTION` of the memory)."""
        return int(FIT_FRACTION * self.memory)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.memory / GiB:.0f} GiB)"


GPUS: dict[str, GPU] = {
    "a100-40": GPU("a100-40", int(39.4 * GiB), 312e12, 1.555e12),
    "a100-80": GPU("a100-80", int(79.1 * GiB), 312e12, 2.039e12),
    "h100": GPU("h100", int(79.1 * GiB), 989e12, 3.35e12),  # SXM, 80 GB HBM3
    "h200": GPU("h200", int(139.8 * GiB), 989e12, 4.8e12),
    "l40s": GPU("l40s", int(44.4 * GiB), 362e12, 0.864e12),
    "rtx4090": GPU("rtx4090", int(23.6 * GiB), 165e12, 1.008e12),
}


def parse_gpu(spec: str) -> GPU:
    """A name of :data:`GPUS`, or a memory size in GiB (``"24"``: memory only, no time predicted)."""
    key = spec.strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        gib = float(key.removesuffix("gib").removesuffix("g"))
    except ValueError:
        gib = float("nan")
    if not math.isfinite(gib) or gib <= 0:
        raise ConfigError(f"--gpu {spec!r}: give one of {', '.join(GPUS)} or a memory size in GiB (e.g. 24)")
    return GPU(f"{gib:g} GiB", int(gib * GiB))


def roofline_seconds(costs: Iterable[tuple[int, int]], gpu: GPU, efficiency: bool = True) -> float | None:
    """Sum over ops of max(flops / rate, bytes / bandwidth): each op is bound by its math or its memory
    traffic, never both at once. ``efficiency`` applies :data:`MATH_EFFICIENCY` and
    :data:`BANDWIDTH_EFFICIENCY` (the prediction); without it, the peaks (a strict lower bound).
    None when the GPU's rates are unknown."""
    if gpu.bf16 is None or gpu.bandwidth is None:
        return None
    rate = gpu.bf16 * (MATH_EFFICIENCY if efficiency else 1.0)
    bandwidth = gpu.bandwidth * (BANDWIDTH_EFFICIENCY if efficiency else 1.0)
    return sum(max(f / rate, b / bandwidth) for f, b in costs)
