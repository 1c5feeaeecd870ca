"""Quality of the `tiny` main job, arm by arm, measured with `lad-fast evaluate` (issue: objectives and
spatial conditioning).

Every arm shares one trained VQ-GAN (``--vqgan``, e.g. the main job's run), the same phantom training data,
the same seeds and the same diffusion budget; only the diffusion objective, the conditioning and the
sampler differ. Model arms (trained once each, into ``--work/<model>/``):

- ``lad``: Lad's official diffusion settings (DDPM, T = 300, cosine, eps, L1, global content + structure
  conditions through FiLM) at the tiny sizes;
- ``flow``: flow matching (rectified flow, velocity target, logit-normal t) with the same global conditions;
- ``flow_spatial``: flow matching plus the conditioning mask concatenated to the U-Net input
  (``condition.spatial = "concat"``);
- ``lad_spatial``: Lad's DDPM with the spatial mask (separates the two changes);
- ``flow_spatial_fine``: flow matching with the mask's fractions per octant of each latent voxel
  (``condition.spatial = "concat_fine"``, the tiny and lad default).

Sampling arms (``--n`` volumes each, augmented conditions, one seed): Lad official (ancestral DDPM, all 300
steps, guidance 1), Lad with DDIM-50, and each flow model with Euler or Heun at a few steps. Each output is
scored by :func:`lad_fast.evaluate.report.evaluate` against held-out phantoms (``--real``; made with
seed 1000 when missing) with the segmenter of ``--segmenter``: FID and MMD (segmenter features), mask Dice
with the shuffled baseline, structure (Betti) error, MS-SSIM diversity, and seconds per volume. A guidance
sweep on ``--sweep`` shows the effect of the guidance scale on mask Dice. Results: ``--out`` (JSON, with
the command, device and versions) and a markdown table beside it. Not a test: about 30-60 minutes on two
CPU cores.

    python bench/quality.py --vqgan runs/default --segmenter runs/default

It trains (``lad_fast.train.diffusion.train_diffusion``), as the arms differ in config fields that no
``lad-fast train`` option sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("lad", "flow", "flow_spatial", "lad_spatial", "flow_spatial_fine")
# (name, model, sampler, steps, guidance)
SAMPLING = (
    ("lad official: DDPM-300, g 1", "lad", "ddpm", 300, 1.0),
    ("lad: DDIM-50, g 1", "lad", "ddim", 50, 1.0),
    ("lad: DDIM-50, g 3", "lad", "ddim", 50, 3.0),
    ("lad + spatial: DDIM-50, g 1", "lad_spatial", "ddim", 50, 1.0),
    ("lad + spatial: DDPM-300, g 1", "lad_spatial", "ddpm", 300, 1.0),
    ("flow: Euler-30, g 1", "flow", "euler", 30, 1.0),
    ("flow: Euler-30, g 3", "flow", "euler", 30, 3.0),
    ("flow + spatial: Euler-30, g 1", "flow_spatial", "euler", 30, 1.0),
    ("flow + spatial: Heun-15, g 1", "flow_spatial", "heun", 15, 1.0),
    ("flow + spatial: Euler-30, g 2", "flow_spatial", "euler", 30, 2.0),
    ("flow + spatial: Euler-30, g 3", "flow_spatial", "euler", 30, 3.0),
    ("flow + spatial: Euler-10, g 3", "flow_spatial", "euler", 10, 3.0),
    ("flow + fine spatial: Euler-30, g 1", "flow_spatial_fine", "euler", 30, 1.0),
    ("flow + fine spatial: Heun-15, g 3", "flow_spatial_fine", "heun", 15, 3.0),
    ("flow + fine spatial: Euler-30, g 3 (default)", "flow_spatial_fine", "euler", 30, 3.0),
    ("flow + fine spatial: Euler-10, g 3", "flow_spatial_fine", "euler", 10, 3.0),
)


def model_config(name: str, steps: int | None):
    """The tiny preset with the arm's diffusion objective and conditioning (everything else, the U-Net,
    latent normalisation and training budget included, as the preset has it)."""
    from lad_fast.config import get_preset

    cfg = get_preset("tiny")
    objective = "flow" if name.startswith("flow") else "ddpm"
    spatial = {"spatial": "concat", "fine": "concat_fine"}.get(name.rsplit("_", 1)[-1], "none")
    cfg = replace(
        cfg,
        diffusion=replace(cfg.diffusion, objective=objective),
        condition=replace(cfg.condition, spatial=spatial),
    )
    if steps is not None:
        cfg = replace(cfg, diffusion_train=replace(cfg.diffusion_train, steps=steps))
    return cfg


def held_out(path: Path, n: int) -> Path:
    """A prepared dataset of ``n`` tiny phantoms drawn with seed 1000 (never seen in training)."""
    if (path / "index.json").is_file():
        return path
    lad = [sys.executable, "-m", "lad_fast.cli.app"]
    src = path.with_name(path.name + "-src")
    subprocess.run(
        [*lad, "phantom", str(src), "--n", str(n), "--preset", "tiny", "--seed", "1000"], check=True
    )
    subprocess.run([*lad, "prepare", str(src), str(path), "--preset", "tiny"], check=True)
    return path


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| arm | FID | MMD lin | MMD gauss | mask Dice | shuffled Dice | structure L1 | diversity "
        "| s/volume |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = [
        f"| {r['name']} | {r['fid']:.3f} | {r['mmd_linear']:.4f} | {r['mmd_gaussian']:.4f} | "
        f"{r['mask_dice']:.3f} | {r['shuffled_mask_dice']:.3f} | {r['structure_l1']:.3f} | "
        f"{r['diversity']:.3f} | {r['seconds_per_volume']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vqgan", type=Path, required=True, help="run holding the trained tiny VQ-GAN")
    ap.add_argument("--segmenter", type=Path, required=True, help="run holding the trained segmenter")
    ap.add_argument("--real", type=Path, default=Path("/tmp/lad-quality/heldout"))
    ap.add_argument("--n-real", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lad-quality"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--arms", nargs="+", default=None, help="sampling arm names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the preset's)")
    ap.add_argument("--n", type=int, default=16, help="volumes per sampling arm")
    ap.add_argument("--sweep", default="flow_spatial_fine", help="model of the guidance sweep ('' for none)")
    ap.add_argument("--sweep-guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = ap.parse_args(argv)

    import torch
    from _common import summary

    from lad_fast.data.cache import phantom_dataset
    from lad_fast.evaluate.report import evaluate
    from lad_fast.generate.generate import generate, sampler_options
    from lad_fast.train.diffusion import train_diffusion

    real = held_out(args.real, args.n_real)
    data = phantom_dataset("tiny")
    trained: dict[str, dict[str, Any]] = {}
    for name in args.models:
        run = args.work / name
        t0 = time.perf_counter()
        result = train_diffusion(
            run, model_config(name, args.steps), data=data, vqgan_run=args.vqgan, resume=True, device="cpu"
        )
        trained[name] = {"run": str(run), "steps": result.step, "train_seconds": time.perf_counter() - t0}
        print(f"trained {name}: {result.step} steps in {trained[name]['train_seconds']:.0f} s", flush=True)

    def measure(label: str, model: str, sampler: str, steps: int, guidance: float) -> dict[str, Any]:
        out = args.work / "generated" / label.replace(" ", "_").replace(":", "").replace(",", "")
        if out.exists():  # this script's own output of an earlier run: generate afresh, to time it
            shutil.rmtree(out)
        t0 = time.perf_counter()
        walks_all = "steps" not in sampler_options(sampler)  # ancestral DDPM: all T steps, no --steps
        generate(
            args.work / model, out, args.n, sampler=sampler, steps=None if walks_all else steps,
            guidance=guidance, batch=4, seed=0, force=True, device="cpu",
        )  # fmt: skip
        seconds = (time.perf_counter() - t0) / args.n
        rep = evaluate(real, out, segmenter=args.segmenter, device="cpu")
        dice = rep["fidelity"]["synthetic"]["dice"]  # per organ, beside the summary's means
        row = {"name": label, "model": model, "sampler": sampler, "steps": steps, "guidance": guidance,
               "seconds_per_volume": seconds, **summary(rep), "dice": dice}  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "dice"}), flush=True)
        return row

    rows = [
        measure(*arm) for arm in SAMPLING if arm[1] in trained and (args.arms is None or arm[0] in args.arms)
    ]
    sweep = []
    if args.sweep and args.sweep in trained:
        sampler, steps = ("euler", 30) if args.sweep.startswith("flow") else ("ddim", 50)
        sweep = [measure(f"{args.sweep} g {g}", args.sweep, sampler, steps, g) for g in args.sweep_guidance]

    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "n_synthetic": args.n,
        "real": str(real),
        "models": trained,
        "arms": rows,
        "guidance_sweep": sweep,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    md = table(rows) + ("\nGuidance sweep:\n\n" + table(sweep) if sweep else "")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
