"""Benchmark ``vq_nearest``: the fused Triton kernel against cdist + argmin and the reference, on CUDA.

Shapes come from a preset (default ``lad``): N = batch x latent voxels of the VQ-GAN (2 x 8 x 64 x 64),
K = codebook size (16384), D = code dim (8), fp32 as the quantiser searches. Prints time, TFLOP/s
(2 N K D for the distance products), GB/s (inputs read once, outputs written once), extra peak memory
and the speed-up against cdist + argmin measured side by side, then appends one JSON line to
``bench/results/vq_nearest.jsonl``. Without CUDA it says so and exits 0 without writing anything.

    python bench/bench_vq_nearest.py [--preset lad] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from _common import DTYPES, append_result, cuda_missing, dtype_name, environment, peak_extra_mib, time_ms


def preset_shape(preset: str) -> tuple[int, int, int]:
    """(N, K, D) that the preset's quantiser searches: batch x latent voxels, codebook size, code dim."""
    from lad_fast.config import get_preset

    cfg = get_preset(preset)
    down = 2 ** (len(cfg.vqgan.channels) - 1)  # one stride-2 downsampling per extra resolution
    voxels = math.prod(s // down for s in cfg.geometry.shape)
    return cfg.vqgan_train.batch_size * voxels, cfg.vqgan.codebook_size, cfg.vqgan.code_dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lad")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--no-write", action="store_true", help="print only; do not append a result line")
    args = parser.parse_args(argv)
    if cuda_missing("bench_vq_nearest"):
        return 0

    from lad_fast.kernels import vq_nearest, vq_nearest_ref

    n, k, d = preset_shape(args.preset)
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, d, device="cuda", dtype=dtype, generator=g)
    codebook = torch.randn(k, d, device="cuda", dtype=dtype, generator=g)

    candidates = {
        "triton": lambda: vq_nearest(z, codebook, impl="triton"),
        "cdist+argmin": lambda: torch.cdist(z.float(), codebook.float()).argmin(1),
        "reference": lambda: vq_nearest_ref(z, codebook),
    }
    # Correctness at the benchmark shape: indices may differ only on float near-ties; compare distances.
    idx, dist = candidates["triton"]()
    _, ref_dist = vq_nearest_ref(z, codebook)
    max_err = (dist - ref_dist).abs().max().item()
    agree = (idx == candidates["cdist+argmin"]()).float().mean().item()

    flops = 2.0 * n * k * d
    nbytes = (n + k) * d * z.element_size() + n * (8 + 4)
    rows: dict[str, dict[str, float]] = {}
    for name, fn in candidates.items():
        fn()  # compile / autotune outside the timing
        ms = time_ms(fn, rep=200)
        rows[name] = {
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "gbps": nbytes / ms / 1e6,
            "peak_extra_mib": peak_extra_mib(fn),
        }
    base = rows["cdist+argmin"]["ms"]
    for r in rows.values():
        r["speedup_vs_cdist"] = base / r["ms"]

    env = environment()
    print(f"vq_nearest  N={n} K={k} D={d} {dtype_name(dtype)}  on {env['device']}")
    print(f"  max |dist - ref| = {max_err:.3g}; index agreement with cdist+argmin = {agree:.6f}")
    print(f"  {'impl':<14}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>10}{'peak MiB':>11}{'vs cdist':>10}")
    for name, r in rows.items():
        print(
            f"  {name:<14}{r['ms']:>10.4f}{r['tflops']:>10.2f}{r['gbps']:>10.1f}"
            f"{r['peak_extra_mib']:>11.1f}{r['speedup_vs_cdist']:>9.2f}x"
        )

    record: dict[str, Any] = {
        "op": "vq_nearest",
        **env,
        "preset": args.preset,
        "shape": {"N": n, "K": k, "D": d, "dtype": dtype_name(dtype)},
        "max_abs_dist_err": max_err,
        "index_agreement_vs_cdist": agree,
        "results": rows,
    }
    if not args.no_write:
        print(f"appended to {append_result('vq_nearest', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
