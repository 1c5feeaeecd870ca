"""Condition augmentation speed: 100 augmented masks plus their structure conditions from one case.

Uses the official Lad reference case (32x256x256, `lad` geometry) mapped to canonical ids, prints the
time and appends one JSON line to bench/results/augment.jsonl. Target: under 20 s on two CPU cores.

    python bench/bench_augment.py [--n 100] [--seed 0] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy

from lad_fast.conditioning.augment import augment_mask
from lad_fast.conditioning.conditions import structure_condition
from lad_fast.config import get_preset
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.utils.atomic import append_line

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    cfg = get_preset("lad")
    lut = np.array([0, CANONICAL_ID["pancreas"], CANONICAL_ID["pancreatic_lesion"]], dtype=np.uint8)
    mask = lut[np.load(args.data / "lad_reference" / "Case_00001_mask.npy")]

    t_aug = t_cond = 0.0
    draws = 0
    for k in range(args.n):
        t = time.perf_counter()
        out, record = augment_mask(
            mask, cfg.geometry.spacing, cfg.augment, np.random.default_rng([args.seed, k])
        )
        t_aug += time.perf_counter() - t
        t = time.perf_counter()
        structure_condition(out, cfg.condition)
        t_cond += time.perf_counter() - t
        draws += record["draws"]
    total = t_aug + t_cond
    print(f"{args.n} augmented {'x'.join(map(str, mask.shape))} masks + structure conditions")
    print(f"{'augment':<24} {t_aug:>8.2f} s")
    print(f"{'structure conditions':<24} {t_cond:>8.2f} s")
    print(f"{'total':<24} {total:>8.2f} s   (target < 20 s; {draws / args.n:.2f} draws per mask)")
    record = {
        "bench": "augment",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "shape": list(mask.shape),
        "n": args.n,
        "augment_s": round(t_aug, 3),
        "conditions_s": round(t_cond, 3),
        "total_s": round(total, 3),
        "mean_draws": round(draws / args.n, 3),
    }
    append_line(ROOT / "bench" / "results" / "augment.jsonl", json.dumps(record))


if __name__ == "__main__":
    main()
