"""Triton kernel of ``vq_nearest`` (imported lazily: only when the Triton path runs).

One program owns ``BLOCK_N`` rows of z and sweeps the whole codebook in ``BLOCK_K`` blocks, keeping a
running (min, argmin) per row in registers, so the (N, K) distance matrix never exists: extra memory is
the two (N,) outputs plus the (K,) code norms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lad_fast.kernels._dispatch import interpreter_on


def _configs() -> list[triton.Config]:
    if interpreter_on():
        # The interpreter runs ~0.01 GFLOP/s: one small config that still exercises several row blocks,
        # several codebook blocks and the ragged last block on the tiny test shapes.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (64, 128)
        for bk in (64, 128, 256)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles that cannot pay off: blocks larger than the problem, and big tiles with wide codes."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}  # where constexpr kwargs land differs across Triton versions
    n, k, block_d = args["N"], args["K"], args["BLOCK_D"]
    kept = []
    for c in configs:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bk > max(64, triton.next_power_of_2(k)) or bn > max(64, triton.next_power_of_2(n)):
            continue
        # z tile + code tile + score tile must fit the register file: shrink tiles for wide codes.
        if block_d >= 128 and bn * bk > 64 * 64:
            continue
        kept.append(c)
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["K", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _vq_nearest_kernel(
    Z,
    C,
    CN,
    IDX,
    DIST,
    N,
    K,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    z = tl.load(
        Z + rows[:, None].to(tl.int64) * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
    )
    zf = z.to(tl.float32)
    zn = tl.sum(zf * zf, axis=1)  # (BLOCK_N,)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        c = tl.load(
            C + codes[:, None].to(tl.int64) * D + dims[None, :],
            mask=code_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        # fp16/bf16 products are exact in fp32, so tensor cores lose nothing; fp32 needs "ieee" (tf32
        # would round z and c to 10 mantissa bits and flip near argmins).
        if IEEE:
            zc = tl.dot(z, tl.trans(c), input_precision="ieee")
        else:
            zc = tl.dot(z, tl.trans(c))
        cn = tl.load(CN + codes, mask=code_ok, other=0.0)
        # ||z||^2 is the same for every code of a row: leave it out of the argmin, add it at the end.
        score = cn[None, :] - 2.0 * zc
        score = tl.where(code_ok[None, :], score, float("inf"))
        blk_min, blk_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Strictly less: on an exact tie the earlier block (lower index) wins, as torch.min does.
        better = blk_min < best
        best = tl.where(better, blk_min, best)
        best_idx = tl.where(better, k0 + blk_arg.to(tl.int64), best_idx)

    tl.store(IDX + rows, best_idx, mask=row_ok)
    tl.store(DIST + rows, tl.maximum(zn + best, 0.0), mask=row_ok)


def launch(z, codebook, code_norms, indices, distances) -> None:
    """Run the kernel; inputs are already checked and contiguous, outputs preallocated (N,)."""
    n, d = z.shape
    k = codebook.shape[0]
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16 along the reduced axis

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _vq_nearest_kernel[grid](
        z,
        codebook,
        code_norms,
        indices,
        distances,
        n,
        k,
        d,
        BLOCK_D=block_d,
        IEEE=z.dtype == torch.float32,
    )
