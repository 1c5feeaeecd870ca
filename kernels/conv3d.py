"""3D convolution and the fused GroupNorm-apply + SiLU + conv + bias + residual used by res blocks.

The Triton path (``kernels/_conv3d_triton.py``, imported lazily) is an implicit GEMM on
channels-last-3d data with fp32 accumulation. The fused op computes per-(n, group) statistics with a
small reduction kernel, then applies the GroupNorm affine and SiLU while loading the GEMM's input tile
and adds bias and residual in the output store, so the normalised activation is never written out.

Both ops are ``torch.library`` custom ops (``lad_fast::conv3d``, ``lad_fast::norm_act_conv3d``) with a
fake (shape) implementation and an autograd formula, so ``torch.compile`` keeps them in one graph.

Backward runs in Triton too (``kernels/_conv3d_bwd_triton.py``, the ops ``lad_fast::conv3d_bwd`` and
``lad_fast::norm_act_conv3d_bwd`` called from the autograd formulas, so the compiled backward graph
holds them as nodes): dgrad is an implicit GEMM over the transposed problem, wgrad a voxel-split GEMM
per tap. For the fused op the GroupNorm statistics are recomputed from the saved input, SiLU's
derivative and the per-channel sums that GroupNorm's backward needs are taken in dgrad's epilogue, and
one elementwise pass finishes the input gradient in place; the activation is recomputed, never
saved, and no fp32 or NCDHW copy of x is made. ``impl="torch"`` (the references) stays the oracle.

The Triton kernel supports kernel sizes 1 to 4 per axis (1, 3, and the (1, 3, 3) / (1, 4, 4) in-plane
shapes), any stride and padding, dilation 1, fp16 / bf16 / fp32. ``impl="auto"`` falls back to the
reference for anything else; ``impl="triton"`` raises instead. Under autocast the Triton path casts x,
weight, bias and residual to the autocast dtype (gamma and beta stay as given), as autocast does for
``F.conv3d`` (custom ops have no autocast rule of their own); the reference gets autocast from its ops.

Precision of fp32 inputs on a GPU, forward and backward: TF32 tensor-core products (fp32 accumulation)
while ``torch.backends.cudnn.allow_tf32`` is on, PyTorch's default, as cuDNN computes ``F.conv3d``;
exact fp32 FMA products when it is off (the kernel tests turn it off to compare at fp32 tolerances).
That path has no tensor cores and keeps operand slices in registers: its autotune configs are pruned to
tiles that do not spill (``kernels/_limits.py``), so it is correct but several times slower. Every
config either path can pick compiles for sm_80 and sm_90 in CI (``kernels/aot.py``).

Each op's body is a plain function (``_<op>_impl``) that ``torch.library.custom_op`` registers, so that
``kernels/aot.py`` can replay recorded calls through the host code on meta tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.kernels._cpu_conv import cpu_conv3d
from lad_fast.kernels._dispatch import autocast_inputs, resolve_impl

IntOr3 = int | tuple[int, int, int]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL = 4


# ----------------------------------------------------------------------------------------- references


def conv3d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, dilation: IntOr3 = 1,
) -> torch.Tensor:  # fmt: skip
    """Reference: ``F.conv3d``. x (N, C, D, H, W), weight (O, C, kd, kh, kw) -> (N, O, D', H', W').

    Also the CPU path: batch-1 fp32 inference runs through oneDNN (``kernels/_cpu_conv.py``), same result.
    """
    return cpu_conv3d(x, weight, bias, stride, padding, dilation)


def norm_act_conv3d_ref(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, weight: torch.Tensor,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, eps: float = 1e-6, dilation: IntOr3 = 1,
) -> torch.Tensor:  # fmt: skip
    """Reference of the res-block chain: conv3d(silu(group_norm(x))) + bias (+ residual).

    x (N, C, D, H, W); gamma, beta (C,); weight (O, C, k, k, k); residual (N, O, D', H', W') or None.
    """
    h = F.silu(F.group_norm(x, groups, gamma, beta, eps))
    out = cpu_conv3d(h, weight, bias, stride, padding, dilation)  # F.conv3d, oneDNN at CPU batch 1
    return out if residual is None else out + residual


# ------------------------------------------------------------------------------------- host checks


def _triple(name: str, value: IntOr3, minimum: int) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{name} must be an int or a tuple of 3 ints (D, H, W), got {value!r}")
    if min(value) < minimum:
        raise ConfigError(f"{name} must be >= {minimum} on every axis, got {tuple(value)}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _check_shapes(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int, int],
    padding: tuple[int, int, int], dilation: tuple[int, int, int],
) -> tuple[int, int, int, int, int]:  # fmt: skip
    """Check ranks and sizes; return the output shape (N, O, D', H', W')."""
    if x.dim() != 5:
        raise ConfigError(f"x must be 5-D (N, C, D, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ConfigError(f"weight must be 5-D (O, C, kd, kh, kw), got shape {tuple(weight.shape)}")
    n, c = x.shape[:2]
    o = weight.shape[0]
    if weight.shape[1] != c:
        raise ConfigError(
            f"channel mismatch: x has {c} channels but weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)}); grouped convolution is not supported"
        )
    if bias is not None and tuple(bias.shape) != (o,):
        raise ConfigError(f"bias must have shape ({o},) (one per output channel), got {tuple(bias.shape)}")
    out = [n, o]
    for axis, (size, k, s, p, d) in enumerate(
        zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True)
    ):
        size_out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if size_out < 1:
            raise ConfigError(
                f"input size {size} on axis {'DHW'[axis]} is too small for kernel {k} with padding {p}: "
                f"the output would be empty; pad the input or use a smaller kernel"
            )
        out.append(size_out)
    return tuple(out)  # type: ignore[return-value]


def _check_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int) -> None:
    c = x.shape[1]
    if not isinstance(groups, int) or groups < 1 or c % groups != 0:
        raise ConfigError(f"groups must be a positive divisor of the {c} input channels, got {groups!r}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (c,):
            raise ConfigError(f"{name} must have shape ({c},) (one per input channel), got {tuple(t.shape)}")


def _triton_unsupported(
    weight: torch.Tensor, dilation: tuple[int, int, int], tensors: dict[str, torch.Tensor | None],
    affine: dict[str, torch.Tensor] | None = None,
) -> str | None:  # fmt: skip
    """Why the Triton kernel cannot run these arguments, or None when it can."""
    if dilation != (1, 1, 1):
        return f"dilation {dilation} is not supported by the Triton kernel (only 1)"
    if max(weight.shape[2:]) > _MAX_KERNEL:
        return (
            f"kernel size {tuple(weight.shape[2:])} is not supported by the Triton kernel "
            f"(1 to {_MAX_KERNEL} per axis)"
        )
    x = tensors["x"]
    assert x is not None
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton kernel (float16, bfloat16 or float32)"
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            return f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; cast them to one dtype"
        if t.device != x.device:
            return f"device mismatch: x is on {x.device} but {name} is on {t.device}"
    for name, t in (affine or {}).items():
        if t.dtype not in (x.dtype, torch.float32):
            return f"dtype mismatch: {name} is {t.dtype}; it must be float32 or x's dtype {x.dtype}"
        if t.device != x.device:
            return f"device mismatch: x is on {x.device} but {name} is on {t.device}"
    return None


def _pick(impl: str, reason: str | None, *tensors: torch.Tensor | None) -> str:
    """Resolve ``impl``; an explicit Triton request that the kernel cannot serve raises, auto falls back."""
    chosen = resolve_impl(impl, *[t for t in tensors if t is not None])
    if chosen == "triton" and reason is not None:
        explicit = impl == "triton" or os.environ.get("LAD_FAST_KERNELS", "") == "triton"
        if explicit:
            raise ConfigError(f"{reason}; use impl='torch' for these arguments")
        return "torch"
    return chosen


# -------------------------------------------------------------------------------------- custom ops


def _out_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> list:
    sizes = [
        (s + 2 * p - k) // st + 1
        for s, k, st, p in zip(x.shape[2:], weight.shape[2:], stride, padding, strict=True)
    ]
    return [x.shape[0], weight.shape[0], *sizes]


def _empty_out(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]):
    return torch.empty(
        _out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device,
        memory_format=torch.channels_last_3d,
    )  # fmt: skip


def _conv3d_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int]
) -> torch.Tensor:
    from lad_fast.kernels import _conv3d_triton as kt

    x = x.contiguous(memory_format=torch.channels_last_3d)
    return kt.launch_conv3d(x, weight, bias, None, tuple(stride), tuple(padding))


_conv3d_op = torch.library.custom_op("lad_fast::conv3d", mutates_args=())(_conv3d_impl)


@_conv3d_op.register_fake
def _(x, weight, bias, stride, padding):
    return _empty_out(x, weight, stride, padding)


def _grad_or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Custom ops cannot return None: a gradient that was not asked for travels as an empty tensor.
    return t if t is not None else like.new_empty(0)


def _conv3d_bwd_impl(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(gx channels-last-3d, gw contiguous, gbias) for needs = [x, weight, bias]; empty where not needed."""
    from lad_fast.kernels import _conv3d_bwd_triton as kb

    cl = torch.channels_last_3d
    dy = grad.contiguous(memory_format=cl)
    gx = gw = gb = None
    if needs[0]:
        gx, _ = kb.conv3d_dgrad(dy, weight, tuple(x.shape), stride, padding)
    if needs[1]:
        x = x.contiguous(memory_format=cl)
        gw = kb.conv3d_wgrad(x, dy, tuple(weight.shape), stride, padding).to(weight.dtype).contiguous()
    if needs[2]:
        gb = dy.sum((0, 2, 3, 4), dtype=torch.float32).to(x.dtype)
    return _grad_or_empty(gx, x), _grad_or_empty(gw, x), _grad_or_empty(gb, x)


_conv3d_bwd_op = torch.library.custom_op("lad_fast::conv3d_bwd", mutates_args=())(_conv3d_bwd_impl)


@_conv3d_bwd_op.register_fake
def _(grad, x, weight, stride, padding, needs):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    gb = x.new_empty(weight.shape[0])
    return tuple(t if need else x.new_empty(0) for t, need in zip((gx, gw, gb), needs, strict=True))


def _conv3d_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.stride, ctx.padding = list(stride), list(padding)


def _conv3d_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = _conv3d_bwd_op(grad, x, weight, ctx.stride, ctx.padding, needs)
    gx, gw, gb = (g if need else None for g, need in zip(grads, needs, strict=True))
    return gx, gw, gb, None, None


_conv3d_op.register_autograd(_conv3d_backward, setup_context=_conv3d_setup)


def _norm_act_conv3d_impl(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, weight: torch.Tensor,
    bias: torch.Tensor | None, residual: torch.Tensor | None, stride: list[int], padding: list[int],
    eps: float,
) -> torch.Tensor:  # fmt: skip
    from lad_fast.kernels import _conv3d_triton as kt

    x = x.contiguous(memory_format=torch.channels_last_3d)
    # Fold the GroupNorm affine into one multiply-add per (n, c): y = x * scale + shift.
    scale, shift, _, _ = _folded_affine(x, gamma, beta, groups, eps)
    return kt.launch_conv3d(x, weight, bias, residual, tuple(stride), tuple(padding), scale, shift)


_norm_act_conv3d_op = torch.library.custom_op("lad_fast::norm_act_conv3d", mutates_args=())(
    _norm_act_conv3d_impl
)


@_norm_act_conv3d_op.register_fake
def _(x, gamma, beta, groups, weight, bias, residual, stride, padding, eps):
    return _empty_out(x, weight, stride, padding)


def _folded_affine(x, gamma, beta, groups, eps):
    """GroupNorm statistics of channels-last-3d x and its affine folded per (n, c): y = x * scale + shift.

    Returns fp32 (scale (N, C), shift (N, C), mean (N, G), rstd (N, G)).
    """
    from lad_fast.kernels import _conv3d_triton as kt

    mean, rstd = kt.group_stats(x, groups, eps)
    cpg = x.shape[1] // groups
    scale = rstd.repeat_interleave(cpg, dim=1) * gamma.float()[None, :]
    shift = beta.float()[None, :] - mean.repeat_interleave(cpg, dim=1) * scale
    return scale.contiguous(), shift.contiguous(), mean, rstd


def _norm_act_bwd_impl(
    grad: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
    groups: int, stride: list[int], padding: list[int], eps: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(gx, ggamma, gbeta, gw, gbias) for needs = [x, gamma, beta, weight, bias]; empty where not needed.

    All in Triton (``_conv3d_bwd_triton``): statistics recomputed from x, SiLU's derivative and the
    GroupNorm partial sums in dgrad's epilogue, the GroupNorm input gradient in one elementwise pass.
    """
    from lad_fast.kernels import _conv3d_bwd_triton as kb

    cl = torch.channels_last_3d
    x = x.contiguous(memory_format=cl)
    dy = grad.contiguous(memory_format=cl)
    scale, shift, mean, rstd = _folded_affine(x, gamma, beta, groups, eps)
    gx, ggamma, gbeta, gw = kb.norm_act_conv3d_backward(
        dy, x, gamma, weight, groups, stride, padding, scale, shift, mean, rstd,
        need_x=needs[0], need_affine=needs[1] or needs[2], need_weight=needs[3],
    )  # fmt: skip
    gb = dy.sum((0, 2, 3, 4), dtype=torch.float32).to(x.dtype) if needs[4] else None
    return (
        _grad_or_empty(gx, x),
        _grad_or_empty(None if ggamma is None else ggamma.to(gamma.dtype), x),
        _grad_or_empty(None if gbeta is None else gbeta.to(beta.dtype), x),
        _grad_or_empty(None if gw is None else gw.to(weight.dtype).contiguous(), x),
        _grad_or_empty(gb, x),
    )


_norm_act_bwd_op = torch.library.custom_op("lad_fast::norm_act_conv3d_bwd", mutates_args=())(
    _norm_act_bwd_impl
)


@_norm_act_bwd_op.register_fake
def _(grad, x, gamma, beta, weight, groups, stride, padding, eps, needs):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    gg, gbt = torch.empty_like(gamma, memory_format=torch.contiguous_format), torch.empty_like(beta)
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    gb = x.new_empty(weight.shape[0])
    grads = (gx, gg, gbt, gw, gb)
    return tuple(t if need else x.new_empty(0) for t, need in zip(grads, needs, strict=True))


def _norm_act_setup(ctx, inputs, output) -> None:
    x, gamma, beta, groups, weight, bias, residual, stride, padding, eps = inputs
    ctx.save_for_backward(x, gamma, beta, weight)
    ctx.groups, ctx.eps = groups, eps
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.stride, ctx.padding = list(stride), list(padding)


def _norm_act_backward(ctx, grad):
    x, gamma, beta, weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[4], ctx.has_bias and n[5]]
    args = (ctx.groups, ctx.stride, ctx.padding, ctx.eps, needs)
    grads = _norm_act_bwd_op(grad, x, gamma, beta, weight, *args)
    gx, ggamma, gbeta, gw, gb = (g if need else None for g, need in zip(grads, needs, strict=True))
    gres = grad if ctx.has_residual and n[6] else None
    return gx, ggamma, gbeta, None, gw, gb, gres, None, None, None


_norm_act_conv3d_op.register_autograd(_norm_act_backward, setup_context=_norm_act_setup)


# ---------------------------------------------------------------------------------- public functions


def conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, dilation: IntOr3 = 1, impl: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """Same result as ``torch.nn.functional.conv3d`` for these arguments (any memory format).

    x (N, C, D, H, W); weight (O, C, kd, kh, kw); bias (O,) or None -> (N, O, D', H', W'). The Triton
    path returns a channels-last-3d tensor in x's dtype.
    """
    s, p, d = _triple("stride", stride, 1), _triple("padding", padding, 0), _triple("dilation", dilation, 1)
    _check_shapes(x, weight, bias, s, p, d)
    cx, cw, cb = autocast_inputs(x, weight, bias)  # what autocast does to F.conv3d's operands
    reason = _triton_unsupported(cw, d, {"x": cx, "weight": cw, "bias": cb})
    if _pick(impl, reason, cx, cw, cb) == "torch":
        return conv3d_ref(x, weight, bias, s, p, d)  # F.conv3d applies autocast itself
    return torch.ops.lad_fast.conv3d(cx, cw, cb, list(s), list(p))


def norm_act_conv3d(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, weight: torch.Tensor,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, eps: float = 1e-6, dilation: IntOr3 = 1, impl: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """conv3d(silu(group_norm(x, groups, gamma, beta, eps))) + bias (+ residual), fused.

    x (N, C, D, H, W); gamma, beta (C,) in x's dtype or float32; weight (O, C, kd, kh, kw); bias (O,)
    or None; residual (N, O, D', H', W') or None -> (N, O, D', H', W'). GroupNorm-apply and SiLU run
    in the input load, bias and residual add in the output store.
    """
    s, p, d = _triple("stride", stride, 1), _triple("padding", padding, 0), _triple("dilation", dilation, 1)
    out_shape = _check_shapes(x, weight, bias, s, p, d)
    _check_norm(x, gamma, beta, groups)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ConfigError(f"residual must have the output shape {out_shape}, got {tuple(residual.shape)}")
    # What autocast does to the chain: the conv operands in the autocast dtype, GroupNorm's gamma and
    # beta as given (autocast runs group_norm in fp32). The reference gets autocast from its own ops.
    cx, cw, cb, cr = autocast_inputs(x, weight, bias, residual)
    reason = _triton_unsupported(
        cw, d, {"x": cx, "weight": cw, "bias": cb, "residual": cr}, {"gamma": gamma, "beta": beta}
    )
    if _pick(impl, reason, cx, gamma, beta, cw, cb, cr) == "torch":
        return norm_act_conv3d_ref(x, gamma, beta, groups, weight, bias, residual, s, p, eps, d)
    return torch.ops.lad_fast.norm_act_conv3d(cx, gamma, beta, groups, cw, cb, cr, list(s), list(p), eps)
