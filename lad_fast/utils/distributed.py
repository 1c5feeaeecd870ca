"""DDP under torchrun, and per-rank data sharding that is a pure function of (seed, step, rank).

``torchrun --nproc_per_node N`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_distributed`
reads them (gloo on CPU, nccl on CUDA). Rank 0 writes every file; other ranks only compute.
Training and generation both use it, so it lives below ``lad_fast.train``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def env_rank() -> int:
    """This process's global rank as torchrun sets it (``RANK``; 0 outside torchrun), readable before the
    process group is joined (the folder lock of ``lad_fast.utils.lock`` is taken by rank 0 only)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def init_distributed(device: torch.device | str = "cpu") -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (idempotent); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def all_true(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over ranks, so every rank takes the same branch (skip or step) together."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_over_ranks(value: int, info: DistInfo, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over ranks (a stop signal one rank received: all stop at the same step)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, step, rank): batches never depend on process history."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`step_seed` (draw on CPU, then move: same on any device)."""
    return torch.Generator().manual_seed(step_seed(seed, step, rank))


def shard_indices(
    n_items: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1
) -> list[int]:
    """Dataset indices of ``rank``'s batch at ``step``: epochs of seeded permutations, split over ranks.

    The global sample stream is ``perm_e[0], perm_e[1], ...`` for epochs e = 0, 1, ... (each a permutation
    seeded by (seed, e)); step s on rank r takes positions ``(s * world + r) * batch_size + i``. Every
    sample is seen once per epoch across all ranks, and the result depends only on the arguments.
    """
    if n_items <= 0:
        raise ValueError("shard_indices needs a non-empty dataset")
    out = []
    start = (step * world + rank) * batch_size
    perm_epoch, perm = -1, None
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n_items)
        if epoch != perm_epoch:
            perm = torch.randperm(
                n_items, generator=torch.Generator().manual_seed(step_seed(seed, epoch, -1))
            )
            perm_epoch = epoch
        out.append(int(perm[i]))  # type: ignore[index]
    return out
