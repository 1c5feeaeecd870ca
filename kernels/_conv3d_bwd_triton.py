"""Triton backward of conv3d and norm_act_conv3d (private; imported lazily by ``kernels/conv3d.py``).

Three kernels on channels-last-3d data, fp32 accumulation:

- ``_dgrad_kernel``: the input gradient as an implicit GEMM over the transposed problem. Rows (M) are
  input voxels of one sample, columns are input channels, the reduction runs over taps x output
  channels: input voxel i receives dy at output voxel (i + pad - k) / stride for each tap k where that
  is a whole number inside the output. With a stride above 1 most taps of a row are masked out (a
  stride-2 3x3x3 conv keeps about 1 in 8): those layers are few in the VQ-GAN and U-Net and the
  masked loads cost no bandwidth, so no sub-pixel split is made. With ``NORM`` (the fused op) the
  epilogue also differentiates SiLU at y = x * scale + shift, recomputed from x (exact: the same fp32
  formula as the forward) and writes per-(sample, row block, channel) partial sums of gy and
  gy * (x - mean), from which the GroupNorm gradient is completed without another read of dy.
- ``_norm_act_grad_kernel``: gx = scale * gy - b - a * (x - mean) with gy recomputed from the stored
  dgrad output, in place. a and b are the per-(sample, group) terms of the GroupNorm backward.
- ``_wgrad_kernel``: the weight gradient, one program per (tap, input-channel block, output-channel
  block, split of the voxels). The reduction over all output voxels is long (millions) and the grid
  otherwise tiny (27 programs for 16 channels), so the voxels are split; each split writes its own
  fp32 partial and the splits are summed in torch (deterministic, no atomics). With ``NORM`` the
  GroupNorm-apply + SiLU prologue of the forward is applied to the loaded x tile (1x1x1 kernels); with
  more taps the caller passes the activation it wrote once (see ``PREACT_MIN_TAPS``).

Nothing is kept from the forward but its inputs: the GroupNorm statistics are recomputed by the same
stats kernel, and no fp32 or NCDHW copy of x is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lad_fast.kernels import _conv3d_triton as kt
from lad_fast.kernels import _limits
from lad_fast.kernels._conv3d_triton import _conv_tiles, gemm_fits, m_bucket, norm_act, weight_layout
from lad_fast.kernels._dispatch import interpreter_on

_INTERP_DGRAD = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}
_INTERP_WGRAD = {"BLOCK_M": 32, "BLOCK_C": 16, "BLOCK_O": 16}
_MAX_BLOCK_M = 128  # the largest BLOCK_M of any config: wgrad chunks are multiples of it
_MIN_DGRAD_BLOCK_M = 64  # every dgrad BLOCK_M is a multiple: the partial sums have one slot per 64 rows


def _dgrad_configs() -> list[triton.Config]:
    if kt.quick_autotune():
        picks = [(128, 64, 32, 3, 4), (128, 128, 32, 3, 8), (64, 32, 32, 4, 4), (64, 16, 16, 3, 4)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=st, num_warps=w)
            for bm, bn, bk, st, w in picks
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=st, num_warps=wp)
        for bm in (64, 128)
        for bn in (16, 32, 64, 128)
        for bk in (16, 32, 64)
        for st, wp in ((3, 4), (4, 4), (3, 8))
    ]


def _prune_dgrad(
    configs: list[triton.Config], named_args: dict, target: _limits.Target | None = None, **kwargs
) -> list[triton.Config]:
    """The forward's rules with the roles swapped: columns are input channels, the reduction output ones.
    The GEMM loop is the forward's without a prologue (NORM is dgrad's epilogue)."""
    kept = _conv_tiles(configs, named_args["C"], named_args["O"])
    target = target or _limits.device_target(named_args)
    elem = _limits.element_size(named_args, "dy_ptr")
    ieee = bool(kwargs.get("IEEE"))
    return _limits.select(kept, configs, lambda c: gemm_fits(c, target, elem, ieee, norm=False))


def _wgrad_configs() -> list[triton.Config]:
    if kt.quick_autotune():
        picks = [(64, 64, 64, 3, 4), (32, 32, 32, 3, 4), (64, 16, 16, 3, 4), (64, 128, 128, 3, 8)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_O": bo}, num_stages=st, num_warps=w)
            for bm, bc, bo, st, w in picks
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_O": bo}, num_stages=st, num_warps=wp)
        for bm in (32, 64, 128)
        for bc in (16, 32, 64, 128)
        for bo in (16, 32, 64, 128)
        for st, wp in ((3, 4), (3, 8))
    ]


def wgrad_smem(config: triton.Config, arch: int, elem: int, ieee: bool, norm: bool) -> int:
    """Shared memory of wgrad's loop: an x tile (BLOCK_M, BLOCK_C) and a dy tile (BLOCK_M, BLOCK_O) per
    stage. With ``norm`` also the prologue's fp32 scale and shift tiles (BLOCK_M, BLOCK_C), and the
    activated, transposed x (the dot's A operand, computed in registers) staged once more, up to twice
    its size (sm_100); its loads then pipeline with ``stages - 1`` buffers on every target."""
    bm, bc, bo = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_C"], config.kwargs["BLOCK_O"]
    per_stage = (bm * bc + bm * bo) * elem + (2 * bm * bc * 4 if norm else 0)
    once = 2 * bm * bc * elem if norm else 0
    return _limits.pipelined_smem(arch, not ieee and not norm, config.num_stages, per_stage, once)


def wgrad_fits(
    config: triton.Config, target: _limits.Target | None, elem: int, ieee: bool, norm: bool
) -> bool:
    """Whether a wgrad config runs on ``target`` without spilling (always, without a target).

    Registers: the fp32 accumulator (BLOCK_C, BLOCK_O) plus the transposed x operand (BLOCK_C, BLOCK_M),
    three times with ``norm`` (x, scale and shift feed the prologue), in values per thread: at most 160
    with 16-bit operands, 96 with TF32 ones, 48 for "ieee" FMA products. With fp32 operands held in
    registers over the reduction ("ieee" everywhere, TF32 on sm_80's mma.sync), BLOCK_M is at most 64;
    TF32 on sm_80 also keeps the transposed x tile alone at most 32 values per thread. Fitted to Triton
    3.9's compiles: on sm_80 a TF32 128 x 64 accumulator over 4 warps spills 0.9 KB per thread, TF32 and
    "ieee" tiles with BLOCK_M = 128 1.2 to 1.5 KB, a TF32 (BLOCK_C, BLOCK_M) = 128 x 64 x tile over 4
    warps 0.8 KB."""
    if target is None:
        return True
    bm, bc, bo = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_C"], config.kwargs["BLOCK_O"]
    threads = 32 * config.num_warps
    live = (bc * bo + bm * bc * (3 if norm else 1)) // threads
    deep_ok = bm <= 64 or elem <= 2 or (not ieee and target.arch >= 90)
    if elem == 4 and not ieee and target.arch < 90:  # TF32 through mma.sync: x fragments in registers
        deep_ok = deep_ok and bc * bm // threads <= 32
    regs_ok = deep_ok and live <= (48 if ieee else 160 if elem <= 2 else 96)
    return regs_ok and wgrad_smem(config, target.arch, elem, ieee, norm) <= target.smem_per_block


def _prune_wgrad(
    configs: list[triton.Config], named_args: dict, target: _limits.Target | None = None, **kwargs
) -> list[triton.Config]:
    """Tiles that fit the problem (channel blocks within the channels; 8 warps for the largest tiles only)
    and the GPU (``wgrad_fits`` on ``target``, by default the device of the launch's tensors)."""
    max_c = max(16, triton.next_power_of_2(named_args["C"]))
    max_o = max(16, triton.next_power_of_2(named_args["O"]))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= max_c and c.kwargs["BLOCK_O"] <= max_o]
    kept = [c for c in kept if c.num_warps == 4 or c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_O"] >= 64 * 64]
    target = target or _limits.device_target(named_args)
    elem = _limits.element_size(named_args, "dy_ptr")
    ieee, norm = bool(kwargs.get("IEEE")), bool(kwargs.get("NORM"))
    return _limits.select(kept, configs, lambda c: wgrad_fits(c, target, elem, ieee, norm))


@triton.jit
def _dgrad_kernel(
    dy_ptr, wt_ptr, gh_ptr, x_ptr, scale_ptr, shift_ptr, mu_ptr, sums_ptr,
    S, C, D, H, W, O, OD, OH, OW, M_BUCKET, RB,
    sdn, sdd, sdh, sdw,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    NORM: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Input gradient of a 3D convolution (transposed implicit GEMM), with the fused GroupNorm + SiLU
    prologue's backward and its per-channel sums in the epilogue. One kernel body of 83 lines: the
    gather, the accumulation loop and the epilogue share their index tensors, which a split into
    ``@triton.jit`` helpers would recompute or pass around as many arguments."""
    # One sample per program (axis 2), so the epilogue's per-channel sums belong to one GroupNorm row.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input voxels of sample n
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    s_mask = offs_s < S
    c_mask = offs_c < C
    iw = offs_s % W
    t = offs_s // W
    ih = t % H
    i_d = t // H
    dy_base = dy_ptr + n.to(tl.int64) * sdn

    o_blocks = tl.cdiv(O, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, KD * KH * KW * o_blocks):
        tap = kk // o_blocks
        o0 = (kk % o_blocks) * BLOCK_K
        kd = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        # Output voxel that tap k of input voxel i came from: o * stride - pad + k = i.
        td = i_d + PD - kd
        th = ih + PH - kh
        tw = iw + PW - kw
        od = td // SD
        oh = th // SH
        ow = tw // SW
        ok = s_mask & (td >= 0) & (th >= 0) & (tw >= 0) & (od < OD) & (oh < OH) & (ow < OW)
        if SD > 1:
            ok = ok & (td % SD == 0)
        if SH > 1:
            ok = ok & (th % SH == 0)
        if SW > 1:
            ok = ok & (tw % SW == 0)
        offs_o = o0 + tl.arange(0, BLOCK_K)
        o_mask = offs_o < O
        a_ptrs = dy_base + (od * sdd + oh * sdh + ow * sdw)[:, None] + offs_o[None, :]
        a = tl.load(a_ptrs, mask=ok[:, None] & o_mask[None, :], other=0.0)
        b_ptrs = wt_ptr + (tap * O + offs_o)[:, None] * C + offs_c[None, :]
        b = tl.load(b_ptrs, mask=o_mask[:, None] & c_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    out_mask = s_mask[:, None] & c_mask[None, :]
    ptrs = (n.to(tl.int64) * S + offs_s)[:, None] * C + offs_c[None, :]  # channels-last contiguous
    g = acc.to(gh_ptr.dtype.element_ty)  # rounded as aten's conv backward rounds its output
    tl.store(gh_ptr + ptrs, g, mask=out_mask)
    if NORM:
        x = tl.load(x_ptr + ptrs, mask=out_mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + n * C + offs_c, mask=c_mask, other=0.0)
        sh = tl.load(shift_ptr + n * C + offs_c, mask=c_mask, other=0.0)
        mu = tl.load(mu_ptr + n * C + offs_c, mask=c_mask, other=0.0)
        y = x * sc[None, :] + sh[None, :]
        sig = tl.sigmoid(y)
        gy = tl.where(out_mask, g.to(tl.float32) * (sig * (1.0 + y * (1.0 - sig))), 0.0)
        xc = tl.where(out_mask, x - mu[None, :], 0.0)  # centred: no cancellation when |mean| >> std
        # RB slots of 64 rows per sample whatever BLOCK_M: a taller block writes its sums into its first
        # slot and zeros into the others, so every slot is written by every config. (Autotuning runs
        # each config on the same buffer: a slot left from another config would be counted twice.)
        SUB: tl.constexpr = BLOCK_M // 64
        slot = pid_m * SUB
        base = sums_ptr + ((n * RB + slot) * 2) * C + offs_c
        tl.store(base, tl.sum(gy, axis=0), mask=c_mask)
        tl.store(base + C, tl.sum(gy * xc, axis=0), mask=c_mask)
        zeros = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(1, SUB):
            if slot + j < RB:
                tl.store(base + j * 2 * C, zeros, mask=c_mask)
                tl.store(base + j * 2 * C + C, zeros, mask=c_mask)


_dgrad_tuned = triton.autotune(
    configs=_dgrad_configs(),
    # IEEE too: the prune keeps other tiles for exact fp32 products than for TF32 ones
    key=["M_BUCKET", "C", "O", "KD", "KH", "KW", "SD", "SH", "SW", "NORM", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_dgrad},
)(_dgrad_kernel)


@triton.jit
def _norm_act_grad_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, mu_ptr, a_ptr, b_ptr,
    S, C,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_s < S)[:, None] & c_mask[None, :]
    ptrs = (n.to(tl.int64) * S + offs_s)[:, None] * C + offs_c[None, :]
    nc = n * C + offs_c
    sc = tl.load(scale_ptr + nc, mask=c_mask, other=0.0)[None, :]
    sh = tl.load(shift_ptr + nc, mask=c_mask, other=0.0)[None, :]
    mu = tl.load(mu_ptr + nc, mask=c_mask, other=0.0)[None, :]
    ga = tl.load(a_ptr + nc, mask=c_mask, other=0.0)[None, :]
    gb = tl.load(b_ptr + nc, mask=c_mask, other=0.0)[None, :]
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    y = x * sc + sh
    sig = tl.sigmoid(y)
    gy = g * (sig * (1.0 + y * (1.0 - sig)))
    gx = sc * gy - gb - ga * (x - mu)
    tl.store(g_ptr + ptrs, gx.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(
    x_ptr, dy_ptr, part_ptr, scale_ptr, shift_ptr,
    M, C, D, H, W, O, OD, OH, OW, CHUNK, M_BUCKET,
    sxn, sxd, sxh, sxw,
    sdn, sdd, sdh, sdw,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    NORM: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    o_blocks = tl.cdiv(O, BLOCK_O)
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid_o = pid % o_blocks
    t = pid // o_blocks
    pid_c = t % c_blocks
    tap = t // c_blocks
    kd = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c_mask = offs_c < C
    o_mask = offs_o < O

    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    start = split * CHUNK
    for m0 in range(start, start + CHUNK, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # output voxels
        m_mask = offs_m < M
        ow = offs_m % OW
        t2 = offs_m // OW
        oh = t2 % OH
        t2 = t2 // OH
        od = t2 % OD
        nb = t2 // OD
        i_d = od * SD - PD + kd
        i_h = oh * SH - PH + kh
        i_w = ow * SW - PW + kw
        inside = m_mask & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        a_mask = inside[:, None] & c_mask[None, :]
        a_rows = nb.to(tl.int64) * sxn + i_d * sxd + i_h * sxh + i_w * sxw
        a = tl.load(x_ptr + (a_rows[:, None] + offs_c[None, :]), mask=a_mask, other=0.0)
        if NORM:
            nc = nb[:, None] * C + offs_c[None, :]
            nc_mask = m_mask[:, None] & c_mask[None, :]
            sc = tl.load(scale_ptr + nc, mask=nc_mask, other=0.0)
            sh = tl.load(shift_ptr + nc, mask=nc_mask, other=0.0)
            y = a.to(tl.float32) * sc + sh
            a = tl.where(a_mask, y * tl.sigmoid(y), 0.0).to(dy_ptr.dtype.element_ty)
        b_ptrs = dy_ptr + (nb.to(tl.int64) * sdn + od * sdd + oh * sdh + ow * sdw)[:, None] + offs_o[None, :]
        b = tl.load(b_ptrs, mask=m_mask[:, None] & o_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)

    taps = KD * KH * KW
    p_ptrs = part_ptr + ((split * taps + tap) * C + offs_c)[:, None].to(tl.int64) * O + offs_o[None, :]
    tl.store(p_ptrs, acc, mask=c_mask[:, None] & o_mask[None, :])


_wgrad_tuned = triton.autotune(
    configs=_wgrad_configs(),
    # IEEE too: the prune keeps other tiles for exact fp32 products than for TF32 ones
    key=["M_BUCKET", "C", "O", "KD", "KH", "KW", "SD", "SH", "SW", "NORM", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_wgrad_kernel)


def _ieee(dtype: torch.dtype) -> bool:
    # fp32 follows PyTorch's switch for convolutions, as the forward does.
    return dtype == torch.float32 and (interpreter_on() or not torch.backends.cudnn.allow_tf32)


def _geometry(kernel: tuple[int, int, int], stride, padding) -> dict:
    return dict(
        SD=stride[0], SH=stride[1], SW=stride[2], PD=padding[0], PH=padding[1], PW=padding[2],
        KD=kernel[0], KH=kernel[1], KW=kernel[2],
    )  # fmt: skip


def conv3d_dgrad(
    dy: torch.Tensor, weight: torch.Tensor, x_shape: tuple[int, ...], stride, padding,
    norm: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Input gradient of conv3d: dy (N, O, D', H', W') channels-last-3d, weight (O, C, kd, kh, kw).

    Returns (g (N, C, D, H, W) channels-last-3d in the weight's dtype, sums). With ``norm`` = (x, scale,
    shift, mu), x channels-last-3d and the others fp32 (N, C), also the fp32 (N, 2, C) sums over voxels
    of gy and gy * (x - mu), gy = g * silu'(x * scale + shift); otherwise sums is None.
    """
    n, c, d, h, w = x_shape
    o, _, kd, kh, kw = weight.shape
    _, _, od, oh, ow = dy.shape
    s = d * h * w
    g = torch.empty(x_shape, device=dy.device, dtype=weight.dtype, memory_format=torch.channels_last_3d)
    rb = triton.cdiv(s, _MIN_DGRAD_BLOCK_M)
    with_norm = norm is not None
    sums = torch.empty((n, rb, 2, c), device=dy.device, dtype=torch.float32) if with_norm else None
    if g.numel() == 0:
        return g, None if sums is None else sums.sum(1)
    wt = weight_layout(weight, "dgrad")
    x, scale, shift, mu = norm if with_norm else (g, g, g, g)  # dummies: never read without NORM
    args = (
        dy, wt, g, x, scale, shift, mu, sums if with_norm else g,
        s, c, d, h, w, o, od, oh, ow, m_bucket(n * s), rb,
        dy.stride(0), dy.stride(2), dy.stride(3), dy.stride(4),
    )  # fmt: skip
    flags = dict(**_geometry((kd, kh, kw), stride, padding), NORM=with_norm, IEEE=_ieee(dy.dtype))

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(s, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]), n)

    if interpreter_on():
        _dgrad_kernel[grid](*args, **flags, **_INTERP_DGRAD)
    else:
        _dgrad_tuned[grid](*args, **flags)
    return g, None if sums is None else sums.sum(1)


def conv3d_wgrad(
    x: torch.Tensor, dy: torch.Tensor, weight_shape: tuple[int, ...], stride, padding,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Weight gradient of conv3d: x (N, C, D, H, W) and dy (N, O, D', H', W') channels-last-3d.

    With ``scale`` / ``shift`` (fp32 (N, C)) x is the fused op's input and silu(x * scale + shift) the
    conv input. Returns fp32 (O, C, kd, kh, kw), summed over the voxel splits.
    """
    n, c, d, h, w = x.shape
    o, _, kd, kh, kw = weight_shape
    _, _, od, oh, ow = dy.shape
    taps = kd * kh * kw
    m = n * od * oh * ow
    if scale is not None and taps >= kt.PREACT_MIN_TAPS:
        x, scale, shift = norm_act(x, scale, shift, dy.dtype), None, None  # see PREACT_MIN_TAPS
    norm = scale is not None
    if interpreter_on():
        split = 1
    else:
        # About four programs per SM of an H100 (132) for the smallest tiles; chunks of whole blocks.
        blocks = taps * triton.cdiv(c, 64) * triton.cdiv(o, 64)
        split = max(1, min(triton.cdiv(528, blocks), triton.cdiv(m, 8 * _MAX_BLOCK_M)))
    chunk = triton.cdiv(triton.cdiv(m, split), _MAX_BLOCK_M) * _MAX_BLOCK_M
    split = max(1, triton.cdiv(m, chunk))
    part = torch.empty((split, taps, c, o), device=x.device, dtype=torch.float32)
    if m == 0:
        return part.new_zeros(weight_shape)
    args = (
        x, dy, part, scale if norm else part, shift if norm else part,
        m, c, d, h, w, o, od, oh, ow, chunk, m_bucket(m),
        x.stride(0), x.stride(2), x.stride(3), x.stride(4),
        dy.stride(0), dy.stride(2), dy.stride(3), dy.stride(4),
    )  # fmt: skip
    flags = dict(**_geometry((kd, kh, kw), stride, padding), NORM=norm, IEEE=_ieee(dy.dtype))

    def grid(meta: dict) -> tuple[int, int]:
        return (taps * triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(o, meta["BLOCK_O"]), split)

    if interpreter_on():
        _wgrad_kernel[grid](*args, **flags, **_INTERP_WGRAD)
    else:
        _wgrad_tuned[grid](*args, **flags)
    gw = part[0] if split == 1 else part.sum(0)  # (taps, C, O)
    return gw.view(kd, kh, kw, c, o).permute(4, 3, 0, 1, 2)


def norm_act_conv3d_backward(
    dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, groups: int,
    stride, padding, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    need_x: bool, need_affine: bool, need_weight: bool,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients (gx, ggamma, gbeta, gw) of conv3d(silu(group_norm(x))) for channels-last-3d x and dy.

    scale, shift (N, C) fp32 are the folded GroupNorm affine; mean, rstd (N, G) fp32 its statistics.
    gx is in x's dtype, ggamma / gbeta fp32 (C,), gw fp32 (O, C, kd, kh, kw); None where not needed.
    """
    n, c = x.shape[:2]
    s = x.shape[2] * x.shape[3] * x.shape[4]
    cpg = c // groups
    gw = conv3d_wgrad(x, dy, tuple(weight.shape), stride, padding, scale, shift) if need_weight else None
    if not (need_x or need_affine):
        return None, None, None, gw
    mu = mean.repeat_interleave(cpg, dim=1).contiguous()  # (N, C)
    g, sums = conv3d_dgrad(dy, weight, tuple(x.shape), stride, padding, (x, scale, shift, mu))
    sg, sgx = sums[:, 0], sums[:, 1]  # (N, C): sums of gy and of gy * (x - mean)
    rstd_c = rstd.repeat_interleave(cpg, dim=1)
    ggamma = (rstd_c * sgx).sum(0) if need_affine else None
    gbeta = sg.sum(0) if need_affine else None
    gx = None
    if need_x:
        # GroupNorm backward: gx = rstd * (gamma gy - mean_g(gamma gy) - xhat * mean_g(gamma gy xhat)).
        gam = gamma.float()[None, :]
        m1 = (gam * sg).view(n, groups, cpg).sum(2) / (cpg * s)  # (N, G)
        m2 = (gam * sgx).view(n, groups, cpg).sum(2) * rstd / (cpg * s)
        coef_b = (rstd * m1).repeat_interleave(cpg, dim=1).contiguous()
        coef_a = (rstd * rstd * m2).repeat_interleave(cpg, dim=1).contiguous()
        block_c = min(64, max(16, triton.next_power_of_2(c)))
        block_s = 16 if interpreter_on() else max(16, 4096 // block_c)
        grid = (triton.cdiv(s, block_s), triton.cdiv(c, block_c), n)
        _norm_act_grad_kernel[grid](
            g, x, scale, shift, mu, coef_a, coef_b, s, c, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4
        )
        gx = g if g.dtype == x.dtype else g.to(x.dtype)
    return gx, ggamma, gbeta, gw
