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
``bench/gpu_suite.py kernels``, the GPU suite's kernel step, on the same inputs (:func:`conv_case`).

Prints time, TFLOP/s, peak memory and ratios (> 1 means Triton is faster) and appends one JSON line
per measurement, with device and versions, to bench/results/conv3d.jsonl. Needs CUDA; on a CPU-only
machine it says so and exits 0 without writing anything.

    python bench/bench_conv3d.py [--dtype float16 bfloat16] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import cached_property

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


@dataclass
class ConvCase:
    """Inputs of one res-block shape and the calls the conv benchmarks time on them.

    x and res are channels-last-3d; gamma and beta fp32, as GroupNorm keeps them. With ``grad``
    (:func:`conv_case`), x, weight, bias, gamma and beta are leaves that require grad (:attr:`leaves`)
    and ``grad`` is the output gradient a forward+backward pass uses.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    res: torch.Tensor
    grad: torch.Tensor
    groups: int

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.weight, self.bias, self.gamma, self.beta]

    @property
    def flops(self) -> float:
        n, c, d, h, w = self.x.shape
        return 2.0 * n * d * h * w * c * self.weight.shape[0] * 27

    def fused(self) -> torch.Tensor:
        """``norm_act_conv3d(impl="triton")``: GroupNorm + SiLU + conv3d + bias + residual in one kernel."""
        return norm_act_conv3d(
            self.x,
            self.gamma,
            self.beta,
            self.groups,
            self.weight,
            self.bias,
            self.res,
            padding=1,
            impl="triton",
        )

    def chain_autocast(self) -> torch.Tensor:
        """The PyTorch chain (cuDNN conv) under autocast, as a training step runs it (fp32: no autocast)."""
        dtype = self.x.dtype
        with torch.autocast(self.x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return norm_act_conv3d_ref(
                self.x, self.gamma, self.beta, self.groups, self.weight, self.bias, self.res, padding=1
            )

    @cached_property
    def _norm_half(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gamma.detach().to(self.x.dtype), self.beta.detach().to(self.x.dtype)

    def chain_half(self) -> torch.Tensor:
        """The PyTorch chain directly in the input dtype, norm parameters cast to it (once, untimed)."""
        g, b = self._norm_half
        return norm_act_conv3d_ref(self.x, g, b, self.groups, self.weight, self.bias, self.res, padding=1)

    def conv_triton(self) -> torch.Tensor:
        return conv3d(self.x, self.weight, self.bias, padding=1, impl="triton")

    def conv_cudnn(self) -> torch.Tensor:
        return F.conv3d(self.x, self.weight, self.bias, padding=1)


def conv_case(shape: dict, dtype: torch.dtype, device: str = "cuda", grad: bool = False) -> ConvCase:
    """The inputs of ``shape`` (an entry of :func:`lad_shapes`) in ``dtype`` on ``device``, seeded on the
    CPU so that every device sees the same numbers; ``grad``: leaves that require grad (the backward)."""
    n, c, (d, h, w), groups = shape["batch"], shape["channels"], shape["size"], shape["groups"]
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last_3d

    def draw(*size: int, scale: float = 1.0, shift: float = 0.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale + shift).to(device, dt)

    x = draw(n, c, d, h, w).contiguous(memory_format=cl)
    weight = draw(c, c, 3, 3, 3, scale=(27 * c) ** -0.5)
    bias = draw(c)
    gamma = draw(c, scale=0.1, shift=1.0, dt=torch.float32)
    beta = draw(c, scale=0.1, dt=torch.float32)
    res = draw(n, c, d, h, w).contiguous(memory_format=cl)
    out_grad = draw(n, c, d, h, w)
    for t in (x, weight, bias, gamma, beta):
        t.requires_grad_(grad)
    return ConvCase(x, weight, bias, gamma, beta, res, out_grad, groups)


def bench_shape(shape: dict, dtype: torch.dtype) -> list[dict]:
    """Forward records of the fused op against the faster PyTorch chain, and of conv3d against cuDNN."""
    case = conv_case(shape, dtype)
    calls = {"fused": case.fused, "chain_autocast": case.chain_autocast, "chain_half": case.chain_half,
             "conv_triton": case.conv_triton, "conv_cudnn": case.conv_cudnn}  # fmt: skip
    # Compile and autotune before anything is timed; check the fused result on the way.
    err = (case.fused().float() - case.chain_autocast().float()).abs().max().item()
    conv_err = (case.conv_triton().float() - case.conv_cudnn().float()).abs().max().item()
    case.chain_half()  # casts the norm parameters once, before the timing
    t = {name: time_ms(fn) for name, fn in calls.items()}
    mem = {name: peak_extra_mib(fn) for name, fn in calls.items()}
    chain = min(t["chain_autocast"], t["chain_half"])
    flops = case.flops
    common = {"shape": list(case.x.shape), "groups": case.groups, "kernel": [3, 3, 3], "padding": 1,
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
