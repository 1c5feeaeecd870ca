"""A small-scale replica of the Lad paper's tables: realism, mask fidelity, topology and SSL Dice per
generator, with training and generation wall time. Not a test.

Rows (one generator each, all at the ``tiny`` preset, trained on the same phantoms):

- ``medical_diffusion``: unconditional latent diffusion without the locality loss (Medical Diffusion-like):
  a VQ-GAN trained with every locality weight 0, then a DDPM (T = 300, cosine, eps, L1, Lad's plain
  latent scaling) whose condition is always dropped (``condition.drop_prob = 1``), sampled with
  ancestral DDPM over all 300 steps at guidance 0 (the unconditional branch).
- ``lad_official``: Lad's official diffusion settings on the locality-trained VQ-GAN: DDPM-300, cosine,
  eps, L1, ``latent_norm="none"``, global content + structure conditions only (``condition.spatial =
  "none"``), an untrained random content projection (``condition.train_content = False``: built once
  from the run's seed and frozen, where the official code builds a new random one at every call), sampled
  with ancestral DDPM over all 300 steps at guidance 1. The structure (Betti) conditions
  are lad-fast's fast path, which equals gudhi's cubical persistence on every slice (tests/test_topology),
  so the "gudhi conditions" are the same numbers. The U-Net is the tiny lad-fast U-Net, not the
  official architecture (whose sizes belong to the ``lad-official`` preset).
- ``lad_official_trained_content`` (not run by default; ``--rows``): ``lad_official`` with its content
  projection trained (``condition.train_content = True``, lad-fast's choice), everything else the same: the
  before/after of the untrained projection, side by side on the same VQ-GAN.
- ``lad_fast``: lad-fast's defaults (flow matching, spatial mask conditioning, Euler-30, guidance 3): an
  existing run (``--lad-fast-run``, copied into ``--work``) or one trained here.

Columns: FID and MMD (segmenter features) and MS-SSIM diversity, mask Dice and structure (Betti) error of
``lad-fast evaluate`` against held-out phantoms; SSL Dice per organ from ``bench/ssl_benchmark.py`` (the
generator's volumes added to the real pool); training and generation wall time.

Stages (each skips what is already done in ``--work``)::

    python bench/paper_table.py --work /tmp/paper --lad-fast-run /tmp/readme_check/runs/default --stage train
    python bench/paper_table.py --work /tmp/paper --stage all

It trains (``train_vqgan`` / ``train_diffusion``): the rows differ in config fields (locality weights,
``drop_prob``, latent normalisation) that no ``lad-fast train`` option sets.
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

ROOT = Path(__file__).resolve().parent  # bench/
RESULTS = ROOT / "results"

ROWS = ("medical_diffusion", "lad_official", "lad_fast")
EXTRA_ROWS = ("lad_official_trained_content",)  # ablations, run when named in --rows
ON_FAST_VQGAN = ("lad_official", "lad_official_trained_content")  # rows sharing lad_fast's VQ-GAN
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")


def row_config(name: str, vqgan_steps: int | None, diffusion_steps: int | None):
    """The tiny preset with the row's VQ-GAN loss, diffusion and sampling settings."""
    from lad_fast.config import SamplingConfig, get_preset

    cfg = get_preset("tiny")
    lad_diffusion = replace(
        cfg.diffusion, objective="ddpm", timesteps=300, schedule="cosine", prediction="eps", loss="l1",
        latent_norm="none", loss_weighting="none",
    )  # fmt: skip
    if name == "medical_diffusion":
        loss = cfg.vqgan_loss
        cfg = replace(
            cfg,
            vqgan_loss=replace(loss, locality_weights=(0.0,) * len(loss.locality_organs)),
            diffusion=lad_diffusion,
            condition=replace(cfg.condition, spatial="none", drop_prob=1.0),
            sampling=SamplingConfig(sampler="ddpm", steps=300, guidance=0.0),
        )
    elif name in ON_FAST_VQGAN:
        cfg = replace(
            cfg,
            diffusion=lad_diffusion,
            condition=replace(cfg.condition, spatial="none", train_content=name != "lad_official"),
            sampling=SamplingConfig(sampler="ddpm", steps=300, guidance=1.0),
        )
    if vqgan_steps is not None:
        cfg = replace(cfg, vqgan_train=replace(cfg.vqgan_train, steps=vqgan_steps))
    if diffusion_steps is not None:
        cfg = replace(cfg, diffusion_train=replace(cfg.diffusion_train, steps=diffusion_steps))
    return cfg


def _log_seconds(run: Path, model: str) -> float | None:
    """Training wall time of ``model`` in ``run`` from its log (the last ``elapsed_s`` of each session)."""
    total, last = 0.0, None
    path = run / "log.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("model") != model:
            continue
        if "elapsed_s" in r:
            last = r["elapsed_s"]
        elif r.get("event") == "resume" and last is not None:
            total, last = total + last, None
    return total + (last or 0.0) if (last is not None or total) else None


def train_rows(
    work: Path,
    lad_fast_run: Path | None,
    vqgan_steps: int | None,
    diffusion_steps: int | None,
    rows: tuple[str, ...] = ROWS,
):
    """Train (or reuse) the three generators under ``work/<row>``; returns {row: info}."""
    from lad_fast.data.cache import phantom_dataset
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    data = phantom_dataset("tiny")
    info: dict[str, Any] = {}
    fast = work / "lad_fast"
    if not fast.exists():
        if lad_fast_run is not None:
            shutil.copytree(lad_fast_run, fast)
        else:
            t0 = time.perf_counter()
            train_vqgan(fast, row_config("lad_fast", vqgan_steps, None), data=data, resume=True, device="cpu")
            train_diffusion(
                fast, row_config("lad_fast", None, diffusion_steps), data=data, resume=True, device="cpu"
            )
            print(f"lad_fast trained in {time.perf_counter() - t0:.0f} s", flush=True)
    for name in [r for r in (*ON_FAST_VQGAN, "medical_diffusion") if r in rows]:
        run = work / name
        cfg = row_config(name, vqgan_steps, diffusion_steps)
        vq = fast
        if name == "medical_diffusion":
            train_vqgan(run, cfg, data=data, resume=True, device="cpu")
            vq = run
        train_diffusion(run, cfg, data=data, vqgan_run=vq, resume=True, device="cpu")
        print(f"{name} trained", flush=True)
    for name in rows:
        run = work / name
        vq_run = fast if name in ON_FAST_VQGAN else run
        info[name] = {
            "run": str(run),
            "vqgan_train_s": _log_seconds(vq_run, "vqgan"),
            "diffusion_train_s": _log_seconds(run, "diffusion"),
        }
    return info


def _lad(cmd: list[str]) -> float:
    """Run one ``lad-fast`` command; returns its wall time."""
    print("$ lad-fast " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "LAD_FAST_QUIET": "1"}
    subprocess.run(
        [sys.executable, "-m", "lad_fast.cli.app", *cmd], check=True, env=env, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def held_out(path: Path, n: int) -> Path:
    """A prepared dataset of ``n`` tiny phantoms drawn with seed 1000 (never seen in training)."""
    if not (path / "index.json").is_file():
        src = path.with_name(path.name + "-src")
        _lad(["phantom", str(src), "--n", str(n), "--preset", "tiny", "--seed", "1000"])
        _lad(["prepare", str(src), str(path), "--preset", "tiny"])
    return path


def generation_seconds(run: Path, out: Path, n: int) -> float:
    """Seconds per volume of ``lad-fast generate`` with the run's own sampler settings, timed on ``n``
    volumes written afresh to ``out`` (the SSL volumes may have been made in an earlier, busier call)."""
    if out.exists():
        shutil.rmtree(out)
    return _lad(["generate", "--out", str(out), "--run", str(run), "--n", str(n), "--seed", "1", "--device",
                 "cpu"]) / n  # fmt: skip


def _pm(s: dict[str, float] | None) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "n/a"


def _num(v: float | None, fmt: str) -> str:
    return format(v, fmt) if v is not None else "n/a"


def markdown(record: dict[str, Any]) -> str:
    rows, ssl = record["rows"], record["ssl"]
    out = [
        "| generator | FID | MMD (lin) | diversity | mask Dice | structure L1 "
        "| VQ-GAN + diffusion train (s) | generation (s/volume) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        train = (r["vqgan_train_s"] or 0) + (r["diffusion_train_s"] or 0)
        out.append(
            f"| {name} | {r['fid']:.3f} | {r['mmd_linear']:.4f} | {r['diversity']:.3f} "
            f"| {r['mask_dice']:.3f} | {r['structure_l1']:.3f} | {train:.0f} "
            f"| {_num(r['generation_s_per_volume'], '.2f')} |"
        )
    out += ["", "SSL fine-tuning Dice per organ (mean ± std over seeds):", ""]
    out.append("| pretraining pool | " + " | ".join(ORGANS) + " | mean |")
    out.append("|" + " --- |" * (len(ORGANS) + 2))
    for arm, s in ssl.items():
        cells = [_pm(s["organs"].get(o)) for o in ORGANS]
        out.append(f"| {arm} | " + " | ".join(cells) + f" | {_pm(s['mean_of_organs'])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lad-paper"))
    ap.add_argument("--lad-fast-run", type=Path, default=None, help="an existing tiny run (copied)")
    ap.add_argument("--vqgan-steps", type=int, default=None, help="VQ-GAN steps (default: the preset's)")
    ap.add_argument("--diffusion-steps", type=int, default=None, help="diffusion steps (default: preset's)")
    ap.add_argument("--segmenter", type=Path, required=False, help="run holding the evaluation segmenter")
    ap.add_argument("--real", type=Path, default=None, help="held-out real volumes (default: 16 phantoms)")
    ap.add_argument("--n-synthetic", type=int, default=32)
    rows_help = "generators to train and score"
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS + EXTRA_ROWS, help=rows_help)
    ap.add_argument("--n-timing", type=int, default=4, help="volumes generated to time each generator")
    ap.add_argument("--ssl-work", type=Path, default=Path("/tmp/lad-ssl-bench"))
    ap.add_argument("--ssl-args", default="", help="extra arguments for bench/ssl_benchmark.py (--scale ...)")
    ssl_arms = ["none", "real", "real+lad_fast", "real+lad_official", "real+medical_diffusion"]
    arms_help = "none given: the SSL table is the last bench/results/ssl_benchmark.json"
    ap.add_argument("--ssl-arms", nargs="*", default=ssl_arms, choices=ssl_arms, help=arms_help)
    ap.add_argument("--stage", choices=("train", "all"), default="all")
    ap.add_argument("--out", type=Path, default=RESULTS / "paper_table.json")
    ap.add_argument("--doc", type=Path, default=ROOT.parent / "docs" / "paper_table.md")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows_run = tuple(args.rows)
    info = train_rows(args.work, args.lad_fast_run, args.vqgan_steps, args.diffusion_steps, rows_run)
    if args.stage == "train":
        print(json.dumps(info, indent=1))
        return 0
    if args.segmenter is None:
        raise SystemExit("--segmenter RUN (a run holding a trained tiny segmenter) is needed for evaluation")

    # SSL arms: the benchmark generates each row's volumes (timed) and skips what it already ran.
    ssl_cmd = [sys.executable, str(ROOT / "ssl_benchmark.py"), "--work", str(args.ssl_work),
               "--lad-fast-run", str(args.work / "lad_fast"),
               "--official-run", str(args.work / "lad_official"),
               "--medical-diffusion-run", str(args.work / "medical_diffusion"), "--n-synthetic",
               str(args.n_synthetic), "--arms", *args.ssl_arms, *args.ssl_args.split()]  # fmt: skip
    if args.ssl_arms:
        print("$ " + " ".join(ssl_cmd[1:]), flush=True)
        subprocess.run(ssl_cmd, check=True)
    ssl_record = json.loads((RESULTS / "ssl_benchmark.json").read_text())

    real = held_out(args.real or args.work / "heldout", 16)
    from _common import summary

    rows: dict[str, Any] = {}
    for name in rows_run:
        synthetic = args.ssl_work / "synthetic" / name
        if not (synthetic / "dataset.json").is_file():  # its SSL arm was not run: generate to evaluate
            _lad(["generate", "--out", str(synthetic), "--run", str(args.work / name), "--n",
                  str(args.n_synthetic), "--seed", "0", "--device", "cpu"])  # fmt: skip
        report = args.work / "evaluate" / f"{name}.json"
        if not report.is_file():
            _lad(["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--segmenter",
                  str(args.segmenter), "--out", str(report), "--device", "cpu", "--force"])  # fmt: skip
        timing = args.work / "timing" / name
        gen_s = generation_seconds(args.work / name, timing, args.n_timing)
        rows[name] = {
            **summary(json.loads(report.read_text())),
            **info[name],
            "synthetic": str(synthetic),
            "generation_s_per_volume": round(gen_s, 3),
            "generation_timed_volumes": args.n_timing,
        }
    import torch

    record = {
        "bench": "paper_table",
        "command": " ".join(["python bench/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
        "scale": "tiny preset (16 x 64 x 64 voxels), procedural phantoms (32 for training, 16 held out), "
        "two shared CPU cores; not AbdomenCT-1K, not GPUs",
        "device": "cpu",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "real": str(real),
        "segmenter": str(args.segmenter),
        "ssl_benchmark": {"command": ssl_record["command"], "scale": ssl_record["scale"]},
        "rows": rows,
        "rows_not_run": [r for r in ROWS if r not in rows_run],
        "ssl": ssl_record["summary"],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    md = markdown(record)
    (args.work / "paper_table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
