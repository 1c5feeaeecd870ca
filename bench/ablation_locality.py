"""Ablation of Lad's locality loss: the VQ-GAN trained with locality weight 0 and with the preset's weight.

Same preset, data, step budget and seed for both arms; reports held-out whole-volume L1 and L1 inside
the pancreas (+ lesion) bounding box, in [-1, 1] units, and appends nothing: it writes one JSON result
(command, device, versions, numbers) to ``--out``.

    python bench/ablation_locality.py                      # tiny preset, its default step budget
    python bench/ablation_locality.py --steps 200 --out bench/results/locality_ablation.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lad_fast.config import LadConfig, get_preset
from lad_fast.runs.loading import load_vqgan
from lad_fast.train.vqgan import train_vqgan
from lad_fast.utils.atomic import write_json

BOX = "pancreas+pancreatic_lesion"


def arm(cfg: LadConfig, weight: float, runs: Path, data: Path | None, device: str) -> dict:
    lc = cfg.vqgan_loss
    cfg = replace(cfg, vqgan_loss=replace(lc, locality_weights=tuple(weight for _ in lc.locality_organs)))
    run = runs / f"locality-{weight:g}"
    t0 = time.perf_counter()
    result = train_vqgan(run, cfg, data=data, device=device, force=True)
    wall = time.perf_counter() - t0
    _, meta = load_vqgan(run)
    held = meta["heldout"]
    return {
        "locality_weight": weight,
        "steps": result.step,
        "wall_s": round(wall, 1),
        "steps_per_s": round(result.step / wall, 3),
        "heldout_l1": held["l1"],
        "heldout_box_l1": held["box_l1"].get(BOX),
        "heldout_cases": held["cases"],
        "box_cases": held["box_cases"].get(BOX),
        "train_l1_last_window": result.losses.get("l1"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=None, help="step budget of both arms (default: the preset's)")
    p.add_argument("--data", type=Path, default=None, help="prepared dataset (default: cached phantoms)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=None, help="where the two runs go (default: a temp folder)")
    p.add_argument("--out", type=Path, default=Path("bench/results/locality_ablation.json"))
    args = p.parse_args()

    os.environ.setdefault("LAD_FAST_QUIET", "1")
    cfg = get_preset(args.preset)
    tc = cfg.vqgan_train
    cfg = replace(cfg, vqgan_train=replace(tc, steps=args.steps or tc.steps, seed=args.seed, preview_every=0))
    default_weight = cfg.vqgan_loss.locality_weights[0]
    with tempfile.TemporaryDirectory(prefix="lad-fast-ablation-") as tmp:
        runs = args.runs or Path(tmp)
        rows = [arm(cfg, w, runs, args.data, args.device) for w in (0.0, default_weight)]

    off, on = rows
    print(f"{'locality weight':>16} {'steps':>6} {'steps/s':>8} {'held-out L1':>12} {'pancreas-box L1':>16}")
    for r in rows:
        print(
            f"{r['locality_weight']:>16g} {r['steps']:>6} {r['steps_per_s']:>8.3f} "
            f"{r['heldout_l1']:>12.4f} {r['heldout_box_l1']:>16.4f}"
        )
    box_ratio = on["heldout_box_l1"] / off["heldout_box_l1"]
    print(
        f"box L1 with / without locality: {box_ratio:.3f}; "
        f"whole L1: {on['heldout_l1'] / off['heldout_l1']:.3f}"
    )
    write_json(
        args.out,
        {
            "bench": "locality_ablation",
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "preset": args.preset,
            "locality_organs": list(cfg.vqgan_loss.locality_organs),
            "locality_mode": cfg.vqgan_loss.locality_mode,
            "seed": args.seed,
            "steps": cfg.vqgan_train.steps,
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "note": "timings taken on a 2-core machine shared with other jobs (pessimistic)",
            "arms": rows,
            "box_l1_ratio_on_over_off": box_ratio,
            "whole_l1_ratio_on_over_off": on["heldout_l1"] / off["heldout_l1"],
            "locality_lowers_box_l1": on["heldout_box_l1"] < off["heldout_box_l1"],
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
