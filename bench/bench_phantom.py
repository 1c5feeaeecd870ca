"""Phantom generation speed: N phantoms written to disk at the ``tiny`` and ``lad`` presets.

Target (issue 2): eight ``tiny`` phantoms in under 10 s on two CPU cores, NIfTI files included.
Prints a table and appends one JSON line per preset to bench/results/phantom.jsonl.

    python bench/bench_phantom.py [--n-tiny 8] [--n-lad 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lad_fast.config import get_preset
from lad_fast.data.phantom.draw import generate_phantom, write_phantoms
from lad_fast.utils.atomic import append_line

RESULTS = Path(__file__).resolve().parent / "results" / "phantom.jsonl"


def machine() -> dict[str, object]:
    import scipy
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
    }


def bench(preset: str, n: int) -> dict[str, object]:
    cfg = get_preset(preset).phantom
    generate_phantom(0, cfg)  # warm imports and caches outside the timing
    t0 = time.perf_counter()
    for k in range(n):
        generate_phantom(k, cfg)
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_phantoms(Path(tmp) / "out", n=n, cfg=cfg, seed=0)
        total_s = time.perf_counter() - t0
    return {
        "bench": "phantom",
        "preset": preset,
        "n": n,
        "shape": list(cfg.shape),
        "spacing": list(cfg.spacing),
        "generate_s": round(gen_s, 3),
        "write_total_s": round(total_s, 3),
        "per_case_s": round(total_s / n, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-tiny", type=int, default=8)
    ap.add_argument("--n-lad", type=int, default=2)
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to results")
    args = ap.parse_args()
    os.environ.setdefault("LAD_FAST_QUIET", "1")
    info = machine()
    rows = [bench("tiny", args.n_tiny)] + ([bench("lad", args.n_lad)] if args.n_lad > 0 else [])
    print(f"{'preset':<6} {'n':>3} {'shape':>14} {'generate s':>11} {'written s':>10} {'s/case':>8}")
    for r in rows:
        shape = "x".join(str(v) for v in r["shape"])  # type: ignore[union-attr]
        print(
            f"{r['preset']:<6} {r['n']:>3} {shape:>14} {r['generate_s']:>11.2f} {r['write_total_s']:>10.2f} "
            f"{r['per_case_s']:>8.2f}"
        )
    tiny = rows[0]
    verdict = "PASS" if tiny["write_total_s"] < 10 else "FAIL"  # type: ignore[operator]
    print(f"{tiny['n']} tiny phantoms written in {tiny['write_total_s']:.2f} s (target < 10 s): {verdict}")
    print(f"machine: {info}")
    if not args.no_save:
        for r in rows:
            append_line(RESULTS, json.dumps({**r, "machine": info}))


if __name__ == "__main__":
    main()
