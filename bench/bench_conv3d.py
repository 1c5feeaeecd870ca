"""Benchmark: Triton conv3d and the fused GroupNorm + SiLU + conv3d + bias + residual against PyTorch.

Shapes are the 3x3x3 res-block convolutions of the ``lad`` preset: the VQ-GAN encoder levels
(batch 2; 16 channels at 32x256x256, 32 at 16x128x128, 64 at 8x64x64) and the U-Net levels (batch 5;
64 x (1, 2, 4, 8) channels on the 8x64x64 latent, halved in-plane per level). For each shape and dtype
it measures, side by side in one run:

- fused ``norm_act_conv3d(impl="triton")`` against the PyTorch chain
  ``conv3d(silu(group_norm(x))) + residual`` (cuDNN), timed both under autocast (GroupNorm in fp32, as
  a training step runs it) and directly in half precision; the ratio uses the faster of the two;
- plain ``conv3d(impl="triton")`` against ``F.conv3d`` on the same channels-last-3d input.

Forward only; forward+backward (the Triton dgrad / wgrad against cuDNN's) is measured by
``bench/gpu_suite.py kernels``, the GPU suite's kernel step.

Prints time, TFLOP/s, peak memory and ratios (> 1 means Triton is faster) and appends one JSON line
per measurement, with device and versions, to bench/results/conv3d.jsonl. Needs CUDA; on a CPU-only
machine it says so and exits 0 without writing anything.

    python bench/bench_conv3d.py [--dtype float16 bfloat16] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import DTYPES, append_result, cuda_missing, dtype_name, environment, peak_extra_mib, time_ms

from lad_fast.config import get_preset
from lad_fast.kernels import conv3d, norm_act_conv3d, norm_act_conv3d_ref


def lad_shapes() -> list[dict]:
    """Res-block shapes (name, batch, channels, (D, H, W), groups) of the ``lad`` preset."""
    cfg = get_preset("lad")
    shapes = []
    d, h, w = cfg.geometry.shape
    for level, ch in enumerate(cfg.vqgan.channels):
        size = (d >> level, h >> level, w >> level)  # stride-2 downsampling on every axis per level
        shapes.append(
            {"name": f"vqgan.l{level}", "batch": cfg.vqgan_train.batch_size, "channels": ch, "size": size,
             "groups": cfg.vqgan.groups}
        )  # fmt: skip
    down = 2 ** (len(cfg.vqgan.channels) - 1)
    latent = (d // down, h // down, w // down)  # (8, 64, 64)
    for level, mult in enumerate(cfg.unet.multipliers):
        size = (latent[0], latent[1] >> level, latent[2] >> level)  # Lad resamples in-plane only
        shapes.append(
            {"name": f"unet.l{level}", "batch": cfg.diffusion_train.batch_size,
             "channels": cfg.unet.channels * mult, "size": size, "groups": cfg.unet.groups}
        )  # fmt: skip
    return shapes


def bench_shape(shape: dict, dtype: torch.dtype) -> list[dict]:
    n, c, (d, h, w), groups = shape["batch"], shape["channels"], shape["size"], shape["groups"]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cl = torch.channels_last_3d
    x = torch.randn(n, c, d, h, w, device=dev, generator=gen).to(dtype).contiguous(memory_format=cl)
    res = torch.randn(n, c, d, h, w, device=dev, generator=gen).to(dtype).contiguous(memory_format=cl)
    weight = (torch.randn(c, c, 3, 3, 3, device=dev, generator=gen) / (27 * c) ** 0.5).to(dtype)
    bias = torch.randn(c, device=dev, generator=gen).to(dtype)
    gamma = 1 + 0.1 * torch.randn(c, device=dev, generator=gen)  # fp32, as GroupNorm keeps it
    beta = 0.1 * torch.randn(c, device=dev, generator=gen)
    flops = 2.0 * n * d * h * w * c * c * 27

    def fused() -> torch.Tensor:
        return norm_act_conv3d(x, gamma, beta, groups, weight, bias, res, padding=1, impl="triton")

    def chain_autocast() -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype):
            return norm_act_conv3d_ref(x, gamma, beta, groups, weight, bias, res, padding=1)

    g_h, b_h = gamma.to(dtype), beta.to(dtype)

    def chain_half() -> torch.Tensor:
        return norm_act_conv3d_ref(x, g_h, b_h, groups, weight, bias, res, padding=1)

    def conv_triton() -> torch.Tensor:
        return conv3d(x, weight, bias, padding=1, impl="triton")

    def conv_cudnn() -> torch.Tensor:
        return F.conv3d(x, weight, bias, padding=1)

    # Compile and autotune before anything is timed; check the fused result on the way.
    err = (fused().float() - chain_autocast().float()).abs().max().item()
    conv_err = (conv_triton().float() - conv_cudnn().float()).abs().max().item()
    t = {name: time_ms(fn) for name, fn in [("fused", fused), ("chain_autocast", chain_autocast),
                                              ("chain_half", chain_half), ("conv_triton", conv_triton),
                                              ("conv_cudnn", conv_cudnn)]}  # fmt: skip
    mem = {name: peak_extra_mib(fn) for name, fn in [("fused", fused), ("chain_autocast", chain_autocast),
                                                 ("chain_half", chain_half), ("conv_triton", conv_triton),
                                                 ("conv_cudnn", conv_cudnn)]}  # fmt: skip
    chain = min(t["chain_autocast"], t["chain_half"])
    common = {"shape": [n, c, d, h, w], "groups": groups, "kernel": [3, 3, 3], "padding": 1,
              "dtype": dtype_name(dtype), "name": shape["name"]}  # fmt: skip
    return [
        {**common, "op": "norm_act_conv3d", "ms": t["fused"], "tflops": flops / t["fused"] / 1e9,
         "peak_mib": mem["fused"], "ref_ms": chain, "ref_ms_autocast": t["chain_autocast"],
         "ref_ms_half": t["chain_half"], "ref_peak_mib": min(mem["chain_autocast"], mem["chain_half"]),
         "speedup": chain / t["fused"], "max_abs_err": err},
        {**common, "op": "conv3d", "ms": t["conv_triton"], "tflops": flops / t["conv_triton"] / 1e9,
         "peak_mib": mem["conv_triton"], "ref_ms": t["conv_cudnn"], "ref_peak_mib": mem["conv_cudnn"],
         "speedup": t["conv_cudnn"] / t["conv_triton"], "max_abs_err": conv_err},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="only the first VQ-GAN and U-Net shapes")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/results/conv3d.jsonl")
    args = parser.parse_args(argv)
    if cuda_missing("bench_conv3d"):
        return 0
    env = environment()
    shapes = lad_shapes()
    if args.quick:
        shapes = [s for s in shapes if s["name"] in ("vqgan.l0", "unet.l0")]
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}")
    cols = ("ms", "TFLOP/s", "MiB", "ref ms", "ref MiB")
    print(f"{'op':16} {'shape':24} {'dtype':9} " + " ".join(f"{c:>8}" for c in cols) + f" {'x':>6}")
    path = None
    for name in args.dtype:
        for shape in shapes:
            for rec in bench_shape(shape, DTYPES[name]):
                dims = "x".join(str(v) for v in rec["shape"])
                print(
                    f"{rec['op']:16} {dims:24} {rec['dtype']:9} {rec['ms']:8.3f} {rec['tflops']:8.1f} "
                    f"{rec['peak_mib']:8.1f} {rec['ref_ms']:8.3f} {rec['ref_peak_mib']:8.1f} "
                    f"{rec['speedup']:6.2f}"
                )
                if not args.no_write:
                    path = append_result("conv3d", {**env, **rec})
    if path is not None:
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
