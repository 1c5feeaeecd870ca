"""Triton kernels of ``attention`` (imported lazily: only when the Triton path runs).

Flash-attention-2 recipe over (B * heads, L, d) contiguous tensors:

- q, k, v and dO are read through their (batch, head, row) strides, so the (B, L, heads, d) -> (B, heads,
  L, d) views that attention blocks produce need no copy (only the last dim must be dense); O, the
  logsumexp and the gradients are written contiguous.
- forward: one program per (query block, batch-head); online softmax over key blocks with fp32 running
  max / sum in base 2 (``exp2`` with log2(e) folded into the scale); stores O and the base-2
  logsumexp per query row for the backward.
- backward: a preprocess kernel for delta = rowsum(dO * O); then two kernels without atomics, one that
  owns a key block and sweeps the queries (dK, dV), one that owns a query block and sweeps the keys
  (dQ). Recomputing P twice costs ~1.25x the FLOPs of an atomic dQ, but the result is deterministic
  and needs no fp32 dQ buffer or zero-fill; at the ``lad`` sequence lengths (<= a few thousand tokens)
  there are enough (block, batch-head) programs to fill the GPU either way.

fp32 inputs take TF32 tensor-core products only when ``torch.backends.cuda.matmul.allow_tf32`` is on
(``IEEE`` otherwise: exact FMA products, see ``attention.py``). The autotune prunes keep, on a GPU, the
configs within its shared memory and each kernel's register budget (``_KERNEL_TILES``, ``_limits.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lad_fast.kernels import _limits
from lad_fast.kernels._dispatch import interpreter_on

LOG2E = 1.4426950408889634


def _configs(big: tuple[int, ...], small: tuple[int, ...], owner: str, sweep: str) -> list[triton.Config]:
    if interpreter_on():
        # The interpreter runs ~0.01 GFLOP/s: one small config that still exercises several blocks and
        # the ragged last block on the tiny test shapes.
        return [triton.Config({owner: 16, sweep: 16}, num_warps=1)]
    return [
        triton.Config({owner: bo, sweep: bs}, num_warps=w, num_stages=s)
        for bo in big
        for bs in small
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


# Per kernel, in tiles of (swept x d) or (owned x d): loaded per iteration (fwd: K and V; dK/dV: Q and
# dO, with the LSE and delta rows; dQ: K and V), loaded once (fwd: Q; dK/dV: K and V; dQ: Q and dO), and
# computed tiles that feed a dot as its A operand (fwd: P; dK/dV: P and dS; dQ: dS), which the FMA loop
# ("ieee", fp32) and tcgen05 (sm_100) read from shared memory; then the live-register budgets (tensor
# cores, "ieee") in fp32 values per thread: owned x swept scores plus 2 x owned x d (accumulator and the
# owned operand). Budgets fitted to Triton 3.9's compiles (bench/results/compile_sweep.json).
_KERNEL_TILES = {
    "fwd": dict(loads=2, once=1, staged=1, budget=(96, 48)),
    "dkdv": dict(loads=2, once=2, staged=2, budget=(96, 24)),
    "dq": dict(loads=2, once=2, staged=1, budget=(128, 64)),
}


def attention_smem(
    owner: int, sweep: int, d: int, stages: int, arch: int, elem: int, ieee: bool, kind: str
) -> int:
    """Shared memory of one attention kernel's loop (see ``_KERNEL_TILES``), in bytes; the backward
    kernels' row reductions take up to 2 KB besides."""
    t = _KERNEL_TILES[kind]
    per_stage = t["loads"] * sweep * d * elem + (2 * sweep * 4 if kind == "dkdv" else 0)
    once = t["once"] * owner * d * elem + (2048 if kind != "fwd" else 0)
    if ieee or arch >= 100:
        once += t["staged"] * owner * sweep * (4 if ieee else elem)
    return _limits.pipelined_smem(arch, not ieee, stages, per_stage, once)


def _make_prune(owner: str, sweep: str, kind: str):
    def prune(
        configs: list[triton.Config], named_args: dict, target: _limits.Target | None = None, **kwargs
    ) -> list[triton.Config]:
        """Drop blocks longer than the sequence and tiles too large for the head dim; on a GPU (``target``,
        by default the launch's device) also tiles above its shared memory or the kernel's register
        budget: live fp32 values per thread (owned x swept scores, owned x d accumulator and operand)
        at most 96 / 96 / 128 (fwd / dK dV / dQ) on tensor cores and 48 / 24 / 64 for "ieee" FMA products,
        fitted to Triton 3.9's compiles (bench/results/compile_sweep.json)."""
        if len(configs) == 1:
            return configs
        args = {**named_args, **kwargs}  # where constexpr kwargs land differs across Triton versions
        seq, head_dim = args["L"], args["HEAD_DIM"]
        cap = max(32, triton.next_power_of_2(seq))
        kept = []
        for c in configs:
            bo, bs = c.kwargs[owner], c.kwargs[sweep]
            if bo > cap or bs > cap:
                continue
            # Owned tiles (and their fp32 accumulators) live in registers: keep them small at d = 128.
            if head_dim >= 128 and (bo > 64 or c.num_stages > 3):
                continue
            kept.append(c)
        target = target or _limits.device_target(named_args)
        if target is None:
            return kept or configs[:1]
        elem, ieee = _limits.element_size(named_args, "Q"), bool(args.get("IEEE"))
        budget = _KERNEL_TILES[kind]["budget"][1 if ieee else 0]

        def fits(c: triton.Config) -> bool:
            bo, bs = c.kwargs[owner], c.kwargs[sweep]
            live = (bo * bs + 2 * bo * head_dim) // (32 * c.num_warps)
            smem = attention_smem(bo, bs, head_dim, c.num_stages, target.arch, elem, ieee, kind)
            return live <= budget and smem <= target.smem_per_block

        return _limits.select(kept, configs, fits)

    return prune


@triton.autotune(
    configs=_configs((64, 128), (32, 64, 128), "BLOCK_M", "BLOCK_N"),
    key=["L", "HEAD_DIM", "IEEE"],  # IEEE: the prune keeps other tiles for it
    prune_configs_by={"early_config_prune": _make_prune("BLOCK_M", "BLOCK_N", "fwd")},
)
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    L,
    H,
    qk_scale,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    base = bh * L * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < L
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k = tl.load(K + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # Keys past L get -inf; the first block always holds key 0, so m_new is finite from the start.
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None],
    )
    tl.store(LSE + bh * L + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, L, H, sdb, sdh, sdl, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < L
    o_off = bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do_off = b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :]
    o = tl.load(O + o_off, mask=m_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + do_off, mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.autotune(
    configs=_configs((64, 128), (32, 64), "BLOCK_N", "BLOCK_M"),
    key=["L", "HEAD_DIM", "IEEE"],  # IEEE: the prune keeps other tiles for it
    prune_configs_by={"early_config_prune": _make_prune("BLOCK_N", "BLOCK_M", "dkdv")},
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    L,
    H,
    qk_scale,
    sm_scale,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sdb,
    sdh,
    sdl,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    base = bh * L * HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < L
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    k = tl.load(
        K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0
    )
    v = tl.load(
        V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdl + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
        # Transposed tiles (keys x queries) so that dK and dV accumulate without transposing the result.
        if IEEE:
            s_t = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            s_t = tl.dot(k, tl.trans(q))
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        p_t = tl.where(m_ok[None, :], p_t, 0.0)  # padded query rows (q = dO = 0) must add nothing to dV / dK
        if IEEE:
            dv = tl.dot(p_t, do, dv, input_precision="ieee")
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv)
            dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if IEEE:
            dk = tl.dot(ds_t, q, dk, input_precision="ieee")
        else:
            dk = tl.dot(ds_t.to(q.dtype), q, dk)
    out_off = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.autotune(
    configs=_configs((64, 128), (32, 64), "BLOCK_M", "BLOCK_N"),
    key=["L", "HEAD_DIM", "IEEE"],  # IEEE: the prune keeps other tiles for it
    prune_configs_by={"early_config_prune": _make_prune("BLOCK_M", "BLOCK_N", "dq")},
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    L,
    H,
    qk_scale,
    sm_scale,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sdb,
    sdh,
    sdl,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    base = bh * L * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < L
    K += b * skb + h * skh
    V += b * svb + h * svh
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None], other=0.0
    )
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=m_ok[:, None], other=0.0
    )
    lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k = tl.load(K + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        # Padded keys load as k = v = 0, so their ds columns meet k = 0 and vanish; masking p anyway keeps
        # that from resting on the loads' ``other=0``.
        p = tl.where(n_ok[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq = tl.dot(ds, k, dq, input_precision="ieee")
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(
        DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=m_ok[:, None],
    )


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (B, H, L, d) with a dense last dim (copied only if not), and its (B, H, L) strides."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(2))


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 products in full precision unless PyTorch's matmul switch allows TF32, the switch that SDPA
    and matmul follow (``torch.backends.cuda.matmul.allow_tf32``, set by
    ``torch.set_float32_matmul_precision("high")``); conv3d follows cuDNN's switch the same way."""
    return dtype == torch.float32 and (interpreter_on() or not torch.backends.cuda.matmul.allow_tf32)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, L, d), any strides -> (O contiguous (B, H, L, d), base-2 logsumexp fp32 (B, H, L))."""
    b, h, seq, d = q.shape
    (q, sq), (k, sk), (v, sv) = _rows(q), _rows(k), _rows(v)
    o = torch.empty((b, h, seq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, seq), dtype=torch.float32, device=q.device)
    sm_scale = d**-0.5

    def grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), b * h)

    _attn_fwd_kernel[grid](
        q, k, v, o, lse, seq, h, sm_scale * LOG2E, *sq, *sk, *sv, HEAD_DIM=d, IEEE=_ieee(q.dtype)
    )
    return o, lse


def backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """do, q, k, v (B, H, L, d) any strides; o, lse contiguous from ``forward`` -> contiguous (dQ, dK, dV)."""
    b, h, seq, d = q.shape
    (do, sd), (q, sq), (k, sk), (v, sv) = _rows(do), _rows(q), _rows(k), _rows(v)
    sm_scale = d**-0.5
    ieee = _ieee(q.dtype)
    delta = torch.empty((b, h, seq), dtype=torch.float32, device=q.device)
    block = 16 if interpreter_on() else 64
    _attn_bwd_delta_kernel[(triton.cdiv(seq, block), b * h)](
        o, do, delta, seq, h, *sd, HEAD_DIM=d, BLOCK_M=block
    )
    dq, dk, dv = (torch.empty((b, h, seq, d), dtype=q.dtype, device=q.device) for _ in range(3))
    strides = (*sq, *sk, *sv, *sd)

    def grid_n(meta):
        return (triton.cdiv(seq, meta["BLOCK_N"]), b * h)

    def grid_m(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), b * h)

    _attn_bwd_dkdv_kernel[grid_n](
        q, k, v, do, lse, delta, dk, dv, seq, h, sm_scale * LOG2E, sm_scale, *strides, HEAD_DIM=d, IEEE=ieee
    )
    _attn_bwd_dq_kernel[grid_m](
        q, k, v, do, lse, delta, dq, seq, h, sm_scale * LOG2E, sm_scale, *strides, HEAD_DIM=d, IEEE=ieee
    )
    return dq, dk, dv
