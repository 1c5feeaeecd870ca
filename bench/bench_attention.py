"""Benchmark ``attention``: the Triton flash kernels against SDPA's flash backend, forward and backward.

Shapes come from a preset (default ``lad``): the U-Net's attention levels over the VQ-GAN latent, with
``Downsample3d`` halving every axis per level (lad: latent 8 x 64 x 64, levels 2 and 3 -> L = 512 and
64 tokens), batch = the diffusion training batch (5), heads x head_dim = 8 x 32. q, k, v are strided
views of one packed (B, L, 3, heads, d) projection, as ``AttentionBlock3d`` produces them. Prints time,
TFLOP/s (forward 4 B H L^2 d; backward 2.5x that), extra peak memory and the speed-up against SDPA
measured side by side, then appends one JSON line to ``bench/results/attention.jsonl``. Without CUDA it
says so and exits 0 without writing anything.

    python bench/bench_attention.py [--preset lad] [--dtype bfloat16] [--tokens 512 2048]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from _common import DTYPES, append_result, cuda_missing, dtype_name, environment, peak_extra_mib, time_ms


def preset_shapes(preset: str) -> list[tuple[int, int, int, int]]:
    """(B, heads, L, d) of each attention level of the preset's U-Net."""
    from lad_fast.config import get_preset

    cfg = get_preset(preset)
    down = 2 ** (len(cfg.vqgan.channels) - 1)
    latent = [s // down for s in cfg.geometry.shape]
    shapes = []
    for level in cfg.unet.attention_levels:
        tokens = math.prod(max(1, s // 2**level) for s in latent)
        shapes.append((cfg.diffusion_train.batch_size, cfg.unet.heads, tokens, cfg.unet.head_dim))
    return shapes


def bench_shape(shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lad_fast.kernels import attention

    b, h, seq, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, seq, 3, h, d, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, d) strided views
    grad_out = torch.randn(b, h, seq, d, device="cuda", dtype=dtype, generator=g)
    # The flash backend takes only fp16/bf16; fp32 falls back to SDPA's default choice.
    backend = SDPBackend.FLASH_ATTENTION if dtype != torch.float32 else None

    def sdpa():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    def ours():
        return attention(q, k, v, impl="triton")

    # Correctness at the benchmark shape, forward and gradients, against SDPA in fp32.
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    ref_grad = torch.autograd.grad(ref, qkv, grad_out.float())[0]
    out = ours()
    got_grad = torch.autograd.grad(out, qkv, grad_out)[0]
    err = {
        "fwd": (out.float() - ref).abs().max().item(),
        "bwd": (got_grad.float() - ref_grad).abs().max().item(),
    }

    fwd_flops = 4.0 * b * h * seq * seq * d
    rows: dict[str, dict[str, float]] = {}
    for name, fn in (("triton", ours), ("sdpa", sdpa)):
        out = fn()  # compile / autotune outside the timing
        out.backward(grad_out, retain_graph=True)
        fwd_ms = time_ms(fn, rep=200)
        bwd_ms = time_ms(
            lambda out=out: out.backward(grad_out, retain_graph=True), rep=200, grad_to_none=[qkv]
        )
        rows[name] = {
            "fwd_ms": fwd_ms,
            "bwd_ms": bwd_ms,
            "fwd_tflops": fwd_flops / fwd_ms / 1e9,
            "bwd_tflops": 2.5 * fwd_flops / bwd_ms / 1e9,
            "fwd_peak_extra_mib": peak_extra_mib(fn),
        }
    for r in rows.values():
        r["fwd_speedup_vs_sdpa"] = rows["sdpa"]["fwd_ms"] / r["fwd_ms"]
        r["bwd_speedup_vs_sdpa"] = rows["sdpa"]["bwd_ms"] / r["bwd_ms"]
    return {"shape": {"B": b, "heads": h, "L": seq, "d": d}, "max_abs_err_vs_fp32": err, "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lad")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, nargs="*", help="override the sequence lengths L")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append a result line")
    args = parser.parse_args(argv)
    if cuda_missing("bench_attention"):
        return 0

    shapes = preset_shapes(args.preset)
    if args.tokens:
        b, h, _, d = shapes[0]
        shapes = [(b, h, seq, d) for seq in args.tokens]
    env = environment()
    dtype = DTYPES[args.dtype]
    print(f"attention  {dtype_name(dtype)}  on {env['device']}")
    print(
        f"  {'B,H,L,d':<18}{'impl':<8}{'fwd ms':>9}{'TFLOP/s':>9}{'x sdpa':>8}"
        f"{'bwd ms':>9}{'TFLOP/s':>9}{'x sdpa':>8}{'peak MiB':>10}"
    )
    measured = []
    for shape in shapes:
        m = bench_shape(shape, dtype)
        measured.append(m)
        for name, r in m["results"].items():
            print(
                f"  {','.join(map(str, shape)):<18}{name:<8}{r['fwd_ms']:>9.4f}{r['fwd_tflops']:>9.2f}"
                f"{r['fwd_speedup_vs_sdpa']:>7.2f}x{r['bwd_ms']:>9.4f}{r['bwd_tflops']:>9.2f}"
                f"{r['bwd_speedup_vs_sdpa']:>7.2f}x{r['fwd_peak_extra_mib']:>10.1f}"
            )
        print(
            f"  {'':<18}max |err| vs fp32 SDPA: fwd {m['max_abs_err_vs_fp32']['fwd']:.3g}, "
            f"grad {m['max_abs_err_vs_fp32']['bwd']:.3g}"
        )

    record: dict[str, Any] = {
        "op": "attention",
        **env,
        "preset": args.preset,
        "dtype": dtype_name(dtype),
        "shapes": measured,
    }
    if not args.no_write:
        print(f"appended to {append_result('attention', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
