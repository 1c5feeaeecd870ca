"""What a GPU allows one block, and the bounds the kernels' autotune prunes hold their configs to.

Every prune function takes an optional ``target``. On a GPU the autotuner passes none and the target is
read from the launch's CUDA tensors (``device_target``: the device's own shared-memory limit); the AOT
check (``kernels/aot.py``) passes the table's entry for the architecture it compiles for. Without either
(the interpreter) no hardware bound is applied. With a target, a prune keeps a config only when

- its shared memory, estimated per kernel with ``pipelined_smem``, fits the target's per-block limit:
  otherwise configs that can never run there (262 KB conv tiles for a 227 KB H100) are compiled while
  autotuning and then refused at launch;
- its live fp32 values per thread (accumulators, score tiles, prologue tiles; each kernel says what it
  counts) stay within the kernel's budget, so that ptxas does not spill registers.

fp32 products run on tensor cores in TF32 when PyTorch's switch for the op allows it
(``torch.backends.cudnn.allow_tf32`` for convolutions, on by default as for cuDNN;
``torch.backends.cuda.matmul.allow_tf32`` for attention, off by default as for matmul and SDPA's math
path) and otherwise as exact fp32 ("ieee") FMA products, whose operands also live in registers: the ieee
budgets are half the tensor-core ones or less. Budgets and estimates were fitted to compiles with Triton
3.9 (ptxas 12.9 for sm_80, 13.4 for sm_90 and sm_100) and are checked by every compile of the sweep
(bench/compile_sweep.py): no kept config above the shared-memory limit or ``MAX_SPILL_BYTES``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Target:
    arch: int  # compute capability as major * 10 + minor: 80, 90, 100
    smem_per_block: int  # bytes of shared memory one block can opt in to (sharedMemPerBlockOptin)


# sharedMemPerBlockOptin by architecture: A100 163 KB, H100 / H200 and B200 227 KB (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"). On a GPU the device's own value is used.
TARGETS: dict[str, Target] = {
    "sm_80": Target(80, 166_912),
    "sm_90": Target(90, 232_448),
    "sm_100": Target(100, 232_448),
}
TMEM_COLUMNS = 512  # sm_100 tensor memory per SM, the bound Triton's loader checks

# Register spills a kept config may have: bytes per thread of spill stores and of spill loads, as ptxas
# reports them. A few words spilled outside the main loop cost nothing measurable; the tiles the budgets
# drop spilled kilobytes (fp32 "ieee" 128 x 128: 15 to 47 KB per thread).
MAX_SPILL_BYTES = 128
SMEM_SLACK = 1024  # barriers and reduction scratch beside the tiles (the sweep measured up to 1 KB)


def table_target(arch: int) -> Target:
    """The table's target of an architecture (the nearest listed one at or below it)."""
    known = sorted(TARGETS.values(), key=lambda t: t.arch)
    return next((t for t in reversed(known) if t.arch <= arch), known[0])


@functools.cache
def cuda_target(index: int) -> Target:
    """The limits of CUDA device ``index``, read from the device."""
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    smem = getattr(props, "shared_memory_per_block_optin", 0) or table_target(arch).smem_per_block
    return Target(arch, int(smem))


def device_target(named_args: dict) -> Target | None:
    """The target of the first CUDA tensor among a launch's arguments, or None when there is none."""
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return cuda_target(value.device.index or 0)
    return None


def element_size(named_args: dict, name: str) -> int:
    """Bytes per element of the tensor argument ``name`` (4 when it is not a tensor: fp32 is the widest)."""
    t = named_args.get(name)
    return t.element_size() if isinstance(t, torch.Tensor) else 4


def pipelined_smem(arch: int, tensor_cores: bool, stages: int, per_stage: int, once: int = 0) -> int:
    """Shared memory of a software-pipelined loop, in bytes, as Triton 3.9 allocates it: ``per_stage``
    bytes of tiles loaded in each iteration, ``once`` bytes of tiles staged once, plus ``SMEM_SLACK``.

    Tensor-core loops on sm_90 and later keep one buffer per stage (wgmma and tcgen05 read their operands
    from shared memory); mma.sync (sm_80) and FMA ("ieee") loops keep ``stages - 1``.
    """
    buffers = stages if tensor_cores and arch >= 90 else stages - 1
    return buffers * per_stage + once + SMEM_SLACK


def select(configs: list, fallback: list, ok: Callable[[object], bool]) -> list:
    """The configs ``ok`` accepts; when none is, the first of ``fallback`` (the kernel's whole list,
    smallest tiles first) that is, so that every launch keeps a config that runs."""
    kept = [c for c in configs if ok(c)]
    return kept or [c for c in fallback if ok(c)][:1] or fallback[:1]
