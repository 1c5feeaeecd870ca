"""How many fine-tuning steps does few-label segmentation need before it stops improving? Not a test.

The SSL benchmark (bench/ssl_benchmark.py) fine-tunes every arm for one fixed budget. A budget that stops
while held-out Dice is still rising scores every arm near zero (a floor: the 60-step smoke run learnt
the liver and nothing else), so the budget is read off this curve instead: ``lad-fast ssl finetune
--pretrained none`` (no pretraining: the slowest learner) run well past the budget, held-out Dice scored
every ``--eval-every`` steps, mean over seeds.

    python bench/ssl_budget.py [--labelled 2] [--seeds 0] [--steps 1200] [--eval-every 100] [--budget 300]

Each run is a ``lad-fast`` command in a subprocess, skipped when its ``dice.json`` exists (a rerun
continues). Writes bench/results/ssl_budget.json (per K and step: per-organ and mean Dice over seeds;
the first step within ``--tolerance`` of the best mean, and each organ's Dice at ``--budget``) and
bench/results/ssl_budget.png (the curves, the budget drawn as a vertical line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _curves import ORGANS, curves

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def finetune(work: Path, k: int, seed: int, steps: int, every: int, device: str) -> dict[str, Any]:
    """The scores (final Dice and curve) of one no-pretraining fine-tuning run, run unless it exists."""
    run = work / f"none-k{k}-s{seed}-f{steps}-e{every}"
    dice = run / "finetune" / "dice.json"
    if not dice.is_file():
        cmd = [
            sys.executable, "-m", "lad_fast.cli.app", "ssl", "finetune", "--pretrained", "none",
            "--labelled", str(k), "--steps", str(steps), "--eval-every", str(every), "--seed", str(seed),
            "--run", str(run), "--resume", "--preset", "tiny", "--device", device,
        ]  # fmt: skip
        print("$", " ".join(["lad-fast", *cmd[3:]]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "LAD_FAST_QUIET": "1"})
    return json.loads(dice.read_text())


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step: each organ's Dice and their mean, averaged over the runs that scored that step."""
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    out = []
    for s in steps:
        at = [p["dice"] for r in runs for p in r["curve"] if p["step"] == s]
        organs = {o: round(sum(d.get(o, 0.0) for d in at) / len(at), 4) for o in ORGANS}
        out.append(
            {"step": s, "runs": len(at), **organs, "mean": round(sum(organs.values()) / len(ORGANS), 4)}
        )
    return out


def plateau(curve: list[dict[str, Any]], tolerance: float) -> int | None:
    """The first step whose mean Dice is within ``tolerance`` of the curve's best."""
    if not curve:
        return None
    best = max(p["mean"] for p in curve)
    return next(p["step"] for p in curve if p["mean"] >= best - tolerance)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelled", type=int, nargs="+", default=[2], help="K values (default 2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (default 0)")
    ap.add_argument("--steps", type=int, default=1200, help="steps per run, well past the budget")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--budget", type=int, default=300, help="the benchmark's budget, checked on the curve")
    ap.add_argument("--tolerance", type=float, default=0.02, help="mean Dice below the best still 'flat'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lad-ssl-budget"))
    ap.add_argument("--out", type=Path, default=RESULTS / "ssl_budget.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    per_k = {
        str(k): {
            "none": [finetune(args.work, k, s, args.steps, args.eval_every, args.device) for s in args.seeds]
        }
        for k in args.labelled
    }
    by_k = {}
    for k, arms in per_k.items():
        curve = mean_curve(arms["none"])
        at_budget = next((p for p in curve if p["step"] == args.budget), None)
        by_k[k] = {"curve": curve, "plateau_step": plateau(curve, args.tolerance), "at_budget": at_budget,
                   "best_mean": max((p["mean"] for p in curve), default=None)}  # fmt: skip
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    curves(per_k, png, mark=args.budget)
    import torch

    record = {
        "bench": "ssl_budget", "command": " ".join(["python bench/ssl_budget.py", *(argv or sys.argv[1:])]),
        "arm": "none (no pretraining)", "labelled": args.labelled, "seeds": args.seeds, "steps": args.steps,
        "eval_every": args.eval_every, "budget": args.budget, "tolerance": args.tolerance,
        "data": "built-in tiny phantoms; the first K labelled training cases; held out: the labelled "
        "split's 20 % (lad_fast.train.ssl.held_out_cases)",
        "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "by_k": by_k, "png": png.name, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for k, r in by_k.items():
        print(f"K = {k}: mean Dice over {len(args.seeds)} seed(s)")
        print("step  " + "  ".join(f"{o[:8]:>8}" for o in (*ORGANS, "mean")))
        for p in r["curve"]:
            print(f"{p['step']:>4}  " + "  ".join(f"{p[o]:8.3f}" for o in (*ORGANS, "mean")))
        print(f"within {args.tolerance} of the best mean ({r['best_mean']}) from step {r['plateau_step']}")
    print(f"{args.out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
