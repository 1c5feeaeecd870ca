"""Triton kernel of ``vq_nearest`` (imported lazily: only when the Triton path runs).

One program owns ``BLOCK_N`` rows of z and sweeps the whole codebook in ``BLOCK_K`` blocks, keeping a
running (min, argmin) per row in registers, so the (N, K) distance matrix never exists: extra memory is
the two (N,) outputs plus the (K,) code norms.

fp32 inputs (the quantiser searches in fp32 under autocast too) are not searched with fp32 FMA
products: a first pass uses TF32 tensor cores and keeps the best and second-best score of each row;
where their gap exceeds twice the proven TF32 error bound (``FAST_REL``) the winner is the exact fp32
argmin, and its distance is recomputed in fp32 from the code itself. The rows left (near-ties, exact
ties) are compacted on the device and searched again in full fp32, so the result is exactly that of
the fp32 search, without a host sync. fp16 / bf16 products are exact in fp32 and need no second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lad_fast.kernels import _limits
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


def vq_smem(config: triton.Config, block_d: int, arch: int, elem: int, ieee: bool) -> int:
    """Shared memory of the search loop: a code tile (BLOCK_K, BLOCK_D) per stage, the z tile
    (BLOCK_N, BLOCK_D) once, and 2 KB for the cross-warp min / argmin (measured: up to 2 KB)."""
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    per_stage, once = bk * block_d * elem, bn * block_d * elem + 2048
    return _limits.pipelined_smem(arch, not ieee, config.num_stages, per_stage, once)


def _prune(
    configs: list[triton.Config], named_args: dict, target: _limits.Target | None = None, **kwargs
) -> list[triton.Config]:
    """Drop tiles that cannot pay off: blocks larger than the problem, and big tiles with wide codes; on
    a GPU (``target``, by default the launch's device) also tiles above its shared memory or register
    budget: score-tile values per thread at most 128 for fp16 / bf16, 64 for the TF32 pass (it also keeps
    each row's runner-up) and 32 for the exact fp32 pass (FMA products), fitted to Triton 3.9's compiles."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}  # where constexpr kwargs land differs across Triton versions
    # N_BUCKET (the next power of two of N), not N: it is what the autotune key holds, so the tiles
    # kept here are the same for every N that shares the cached choice.
    n, k, block_d = args["N_BUCKET"], args["K"], args["BLOCK_D"]
    kept = []
    for c in configs:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bk > max(64, triton.next_power_of_2(k)) or bn > max(64, triton.next_power_of_2(n)):
            continue
        # z tile + code tile + score tile must fit the register file: shrink tiles for wide codes.
        if block_d >= 128 and bn * bk > 64 * 64:
            continue
        kept.append(c)
    target = target or _limits.device_target(named_args)
    if target is None:
        return kept or configs[:1]
    elem, ieee = _limits.element_size(named_args, "Z"), bool(args.get("IEEE"))
    budget = 32 if ieee else (64 if args.get("FAST") else 128)

    def fits(c: triton.Config) -> bool:
        live = c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)
        return live <= budget and vq_smem(c, block_d, target.arch, elem, ieee) <= target.smem_per_block

    return _limits.select(kept, configs, fits)


# Exactness margin of the fast fp32 pass. TF32 keeps 10 mantissa bits (truncated: relative error below
# 2^-10 per operand, so below 2^-9 per product), fp32 accumulation over D <= 256 terms adds less than
# 2^-15, and Cauchy-Schwarz bounds sum |z_i c_i| by ||z|| ||c||: every TF32 score cn - 2 z.c lies within
# 2^-8 ||z|| ||c|| of the fp32 one. FAST_REL is twice that; FAST_ABS covers the rounding of the final
# subtraction (relative 2^-24 of |cn| + 2|z.c|). ``tl.constexpr`` globals: compiled Triton reads no other
# module-level values inside @triton.jit. The interpreter reads any, so only a compile tells
# (tests/kernels/test_compile_aot.py).
FAST_REL = tl.constexpr(2.0**-7)
FAST_ABS = tl.constexpr(2.0**-22)


@triton.jit
def _vq_nearest_kernel(
    Z, C, CN, IDX, DIST, FLAG, ROWS, COUNT, CMAX,
    N, K, D, N_BUCKET,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, FAST: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """FAST: TF32 products, the best and second-best score per row; a row whose gap is at least twice
    the error bound is exact (its winner is the fp32 argmin) and gets its distance recomputed in fp32
    from the winning code; any other row is flagged. GATHER: the exact fp32 search over the flagged
    rows, compacted into ROWS[:COUNT]. Neither: the plain search (fp16 / bf16 products are exact)."""
    pid = tl.program_id(0)
    start = pid * BLOCK_N
    count = N
    if GATHER:
        count = tl.load(COUNT)
    if start < count:
        slots = start + tl.arange(0, BLOCK_N)
        row_ok = slots < count
        rows = slots.to(tl.int64)
        if GATHER:
            rows = tl.load(ROWS + slots, mask=row_ok, other=0).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        zmask = row_ok[:, None] & dim_ok[None, :]
        z = tl.load(Z + rows[:, None] * D + dims[None, :], mask=zmask, other=0.0)
        zf = z.to(tl.float32)
        zn = tl.sum(zf * zf, axis=1)  # (BLOCK_N,)

        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        second = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int64)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < K
            c = tl.load(
                C + codes[:, None].to(tl.int64) * D + dims[None, :],
                mask=code_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            # fp16/bf16 products are exact in fp32, so tensor cores lose nothing; the exact fp32 search
            # needs "ieee" (tf32 would round z and c to 10 mantissa bits and flip near argmins).
            if IEEE:
                zc = tl.dot(z, tl.trans(c), input_precision="ieee")
            else:
                zc = tl.dot(z, tl.trans(c))
            cn = tl.load(CN + codes, mask=code_ok, other=0.0)
            # ||z||^2 is the same for every code of a row: leave it out of the argmin, add it at the end.
            score = cn[None, :] - 2.0 * zc
            score = tl.where(code_ok[None, :], score, float("inf"))
            blk_min, blk_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
            if FAST:
                # The block's runner-up: its minimum with the winner's column taken out.
                cols = tl.arange(0, BLOCK_K)[None, :]
                blk_second = tl.min(tl.where(cols == blk_arg[:, None], float("inf"), score), axis=1)
                second = tl.minimum(tl.maximum(best, blk_min), tl.minimum(second, blk_second))
            # Strictly less: on an exact tie the earlier block (lower index) wins, as torch.min does.
            better = blk_min < best
            best = tl.where(better, blk_min, best)
            best_idx = tl.where(better, k0 + blk_arg.to(tl.int64), best_idx)

        tl.store(IDX + rows, best_idx, mask=row_ok)
        if FAST:
            cmax = tl.load(CMAX)
            bound = tl.sqrt(zn) * cmax * FAST_REL + cmax * cmax * FAST_ABS
            tl.store(FLAG + rows, (second - best <= 2.0 * bound).to(tl.int32), mask=row_ok)
            w = tl.load(C + best_idx[:, None] * D + dims[None, :], mask=zmask, other=0.0)
            diff = zf - w.to(tl.float32)
            tl.store(DIST + rows, tl.sum(diff * diff, axis=1), mask=row_ok)
        else:
            tl.store(DIST + rows, tl.maximum(zn + best, 0.0), mask=row_ok)


_vq_tuned = triton.autotune(
    configs=_configs(),
    key=["K", "BLOCK_D", "N_BUCKET", "IEEE", "FAST", "GATHER"],  # the passes differ in cost: tune each
    prune_configs_by={"early_config_prune": _prune},
)(_vq_nearest_kernel)


def launch(z, codebook, code_norms, indices, distances, fast: bool | None = None) -> torch.Tensor | None:
    """Run the search; inputs are already checked and contiguous, outputs preallocated (N,).

    fp32 inputs take the fast pass (``fast=None`` means: for fp32) and then the exact fp32 search over
    the rows it could not certify, without a host sync. Returns the device count of those rows, or None.
    """
    n, d = z.shape
    k = codebook.shape[0]
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16 along the reduced axis
    fp32 = z.dtype == torch.float32
    fast = fp32 if fast is None else fast
    kernel = _vq_nearest_kernel if interpreter_on() else _vq_tuned
    extra = {} if not interpreter_on() else _configs()[0].kwargs

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    common = (z, codebook, code_norms, indices, distances)
    if not fast:
        kernel[grid](*common, indices, indices, indices, code_norms, n, k, d, triton.next_power_of_2(n),
                     BLOCK_D=block_d, IEEE=fp32, FAST=False, GATHER=False, **extra)  # fmt: skip
        return None
    flags = torch.empty(n, dtype=torch.int32, device=z.device)
    cmax = code_norms.max().sqrt().reshape(1)
    kernel[grid](*common, flags, flags, flags, cmax, n, k, d, triton.next_power_of_2(n),
                 BLOCK_D=block_d, IEEE=False, FAST=True, GATHER=False, **extra)  # fmt: skip
    # Compact the flagged rows to the front of `rows` on the device: slot cumsum - 1 for a flagged row,
    # the spare slot n for the others. The exact pass reads the count and skips empty programs.
    pos = torch.cumsum(flags, 0, dtype=torch.int32)
    count = pos[-1:]
    rows = torch.empty(n + 1, dtype=torch.int32, device=z.device)
    slot = torch.where(flags.bool(), pos.long() - 1, n)
    rows.scatter_(0, slot, torch.arange(n, dtype=torch.int32, device=z.device))
    kernel[grid](*common, flags, rows, count, cmax, n, k, d, triton.next_power_of_2(n),
                 BLOCK_D=block_d, IEEE=True, FAST=False, GATHER=True, **extra)  # fmt: skip
    return count
