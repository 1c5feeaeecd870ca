"""Nearest-code search for vector quantisation: squared distance and argmin over a codebook.

The Triton path (``kernels/_vq_triton.py``) fuses the distance and the argmin over codebook blocks with
fp32 accumulation and never materialises the (N, K) matrix: O(N) extra memory. It is registered as the
custom op ``lad_fast::vq_nearest`` so ``torch.compile`` keeps it inside one graph.
"""

from __future__ import annotations

import torch

from lad_fast.errors import ConfigError
from lad_fast.kernels._dispatch import autocast_inputs, resolve_impl

MAX_CODE_DIM = 256
REF_CHUNK = 1 << 22  # distance entries per row chunk of the reference (16 MiB of fp32)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def vq_nearest_ref(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: z (N, D), codebook (K, D) -> (indices int64 (N,), squared distances fp32 (N,)).

    Distances are computed in fp32 whatever the input dtype and whatever the autocast (MONAI practice:
    VQ distances in fp32). On exact ties the lowest index wins. This is also the CPU hot path of VQ-GAN
    training, so it works on row chunks of at most ``REF_CHUNK`` distance entries (16 MiB), reusing one
    buffer: ||z||^2 is the same for every code of a row, so the argmin runs over ||c||^2 - 2 z.c, one
    ``addmm`` per chunk, and ||z||^2 is added back to the winning score only.
    """
    with torch.autocast(z.device.type, enabled=False):  # an autocast matmul would round to 8 bits
        z32, c32 = z.float(), codebook.float()
        n, k = z32.shape[0], c32.shape[0]
        code_norms = (c32 * c32).sum(1)  # (K,)
        rows = max(1, min(n, REF_CHUNK // max(k, 1)))
        score = z32.new_empty(rows, k)  # (rows, K), reused by every chunk: no page faults per chunk
        best = z32.new_empty(n)
        indices = torch.empty(n, dtype=torch.int64, device=z32.device)
        for start in range(0, n, rows):
            chunk = z32[start : start + rows]
            s = torch.addmm(code_norms, chunk, c32.t(), alpha=-2.0, out=score[: chunk.shape[0]])
            torch.min(s, dim=1, out=(best[start : start + rows], indices[start : start + rows]))
        distances = (best + (z32 * z32).sum(1)).clamp_min(0.0)
    return indices, distances


def _check(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2:
        raise ConfigError(
            f"vq_nearest expects z (N, D) and codebook (K, D), got shapes {tuple(z.shape)} and "
            f"{tuple(codebook.shape)}; flatten latents to (N, D) first"
        )
    if z.shape[1] != codebook.shape[1]:
        raise ConfigError(
            f"vq_nearest: z has {z.shape[1]} dims per row but the codebook has {codebook.shape[1]}; "
            "they must match"
        )
    if codebook.shape[0] == 0:
        raise ConfigError("vq_nearest: the codebook is empty (K = 0); it needs at least one code")
    if z.dtype != codebook.dtype or z.dtype not in DTYPES:
        raise ConfigError(
            f"vq_nearest: z and codebook must share one dtype among float32/float16/bfloat16, got "
            f"{z.dtype} and {codebook.dtype}; cast one to the other"
        )
    if z.device != codebook.device:
        raise ConfigError(
            f"vq_nearest: z is on {z.device} but the codebook is on {codebook.device}; move them together"
        )


def _vq_nearest_impl(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from lad_fast.kernels import _vq_triton

    n, d = z.shape
    if d > MAX_CODE_DIM:
        raise ConfigError(
            f"vq_nearest (triton) supports code dims up to {MAX_CODE_DIM}, got {d}; use impl='torch'"
        )
    z, codebook = z.contiguous(), codebook.contiguous()
    # ||c||^2 once per call, in fp32; the kernel reads it per codebook block.
    code_norms = codebook.float().pow(2).sum(1).contiguous()
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    distances = torch.empty(n, dtype=torch.float32, device=z.device)
    if n > 0:
        _vq_triton.launch(z, codebook, code_norms, indices, distances)
    return indices, distances


_vq_nearest_op = torch.library.custom_op("lad_fast::vq_nearest", mutates_args=())(_vq_nearest_impl)


@_vq_nearest_op.register_fake
def _(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


def _vq_setup_context(ctx, inputs, output) -> None:
    # Indices are integers and distances are reported as constants: neither carries a gradient.
    ctx.mark_non_differentiable(*output)


def _vq_backward(ctx, grad_indices, grad_distances):
    return None, None


_vq_nearest_op.register_autograd(_vq_backward, setup_context=_vq_setup_context)


def vq_nearest(
    z: torch.Tensor, codebook: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each row of ``z`` (N, D) in ``codebook`` (K, D).

    Returns (indices int64 (N,), squared distances fp32 (N,)); both carry no gradient. On exact ties the
    lowest index wins. Inputs: float32, float16 or bfloat16, one dtype and one device; D <= 256 on the
    Triton path. Under autocast both are cast to float32 first (the search stays fp32, as for cdist).
    """
    z, codebook = autocast_inputs(z, codebook, dtype=torch.float32)
    _check(z, codebook)
    if resolve_impl(impl, z, codebook) == "triton":
        return _vq_nearest_op(z, codebook)
    with torch.no_grad():
        return vq_nearest_ref(z, codebook)
