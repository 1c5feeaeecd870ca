"""Condition fidelity: do generated volumes follow the anatomy they were conditioned on?

For each guidance scale (default 0, 1 and 3; 0 is the unconditional model) this generates ``--n`` volumes
from a trained run with ``lad_fast.generate.generate.generate``, segments every volume with the built-in organ
segmenter, and compares the segmentation with the (augmented) mask that conditioned it:

- structure error: mean absolute difference between the Lad structure vectors (per-slice Betti numbers
  of cfg.condition.structure_organs) of the segmentation and of the condition mask;
- organ volume error: |V_seg - V_cond| / V_cond per organ, averaged over volumes;
- Dice between the segmentation and the condition mask per organ;

and, beside each, the same scores against a *shuffled* condition mask (another volume's), the floor a
generator that ignores its condition reaches. The scores come from ``lad_fast.evaluate`` (the library
``lad-fast evaluate`` reports with: :func:`lad_fast.evaluate.report.synthetic_fidelity`), over ORGANS.
Conditional generation should beat unconditional on all three. Results go to
bench/results/condition_fidelity.json with the command, device and versions.

    python bench/condition_fidelity.py --run runs/default --segmenter-run runs/seg [--n 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run with a VQ-GAN and a diffusion model")
    parser.add_argument(
        "--segmenter-run", type=Path, default=None, help="run with a segmenter (default --run)"
    )
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--sampler", default=None, help="default: the run's preset")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's preset")
    parser.add_argument("--augment", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lad-fast-condition-fidelity"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "condition_fidelity.json")
    args = parser.parse_args(argv)

    import torch

    from lad_fast.evaluate.report import synthetic_fidelity
    from lad_fast.generate.generate import generate
    from lad_fast.runs.rundir import RunDir

    cfg = RunDir.open(args.run).config()
    results = []
    for g in args.guidance:
        t0 = time.perf_counter()
        out = generate(
            args.run,
            args.work / f"guidance-{g:g}",
            n=args.n,
            sampler=args.sampler,
            steps=args.steps,
            guidance=g,
            augment=args.augment,
            seed=args.seed,
            device="cpu",
            force=True,
        )
        gen_s = time.perf_counter() - t0
        # segmentation, Dice, volume and structure errors: the same library `lad-fast evaluate` reports
        fid = synthetic_fidelity(out, segmenter=args.segmenter_run or args.run, device="cpu", organs=ORGANS)
        syn, shuffled = fid["synthetic"], fid["shuffled"]
        row = {
            "guidance": g,
            "volumes": fid["volumes"],
            "generate_s": round(gen_s, 1),
            "structure_l1": syn["structure_l1"],
            "organ_volume_error": syn["volume_error"],
            "dice": syn["dice"],
            "mean_volume_error": syn["mean_volume_error"],
            "mean_dice": syn["mean_dice"],
            "shuffled": {k: shuffled[k] for k in ("structure_l1", "mean_volume_error", "mean_dice")},
        }
        results.append(row)
        print(
            f"guidance {g:>4g}: structure L1 {row['structure_l1']:.3f}  volume error "
            f"{row['mean_volume_error']:.3f}  Dice {row['mean_dice']:.3f}  (shuffled masks: Dice "
            f"{shuffled['mean_dice']:.3f}, structure L1 {shuffled['structure_l1']:.3f})  ({gen_s:.0f} s)",
            flush=True,
        )

    uncond = next((r for r in results if r["guidance"] == 0), None)
    cond = [r for r in results if r["guidance"] > 0]
    verdict = None
    if uncond and cond:
        verdict = all(
            r["structure_l1"] < uncond["structure_l1"]
            and r["mean_volume_error"] < uncond["mean_volume_error"]
            for r in cond
        )
        print(f"conditional beats unconditional on structure and organ volume: {verdict}")
    record = {
        "bench": "condition_fidelity",
        "command": "python bench/condition_fidelity.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": "cpu",
        "machine": {
            "cpu": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "preset": cfg.preset,
        "sampler": args.sampler,
        "steps": args.steps,
        "augment": args.augment,
        "seed": args.seed,
        "results": results,
        "conditional_beats_unconditional": verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
