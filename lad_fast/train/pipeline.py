"""The main job: ``lad-fast train`` with no subcommand runs every stage of Lad in order.

1. data: the given prepared dataset, or the built-in phantoms (generated and prepared once, cached);
2. phase 1: the VQ-GAN with the locality loss;
3. masks: when some cases have no mask, the organ segmenter is trained on the labelled cases and
   predicts the rest (Lad's "predicted organ masks");
4. phase 2: the conditional latent diffusion model.

Each stage writes its own checkpoint folder in the run; ``--resume`` continues an interrupted pipeline
from the stage and step where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from lad_fast.config import LadConfig
from lad_fast.errors import InputError
from lad_fast.utils.progress import say


def train_pipeline(
    run: Path,
    cfg: LadConfig,
    data: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    holdout: float | None = None,
    batch: int | None = None,
) -> Path:
    """Train every model of a Lad run; returns the run folder. ``steps`` and ``batch`` override every
    stage's budget and batch size;
    ``holdout``: the VQ-GAN's held-out fraction (:func:`lad_fast.train.vqgan.train_vqgan`).

    The dataset is opened once (:func:`lad_fast.train.data.training_dataset`) and handed to every stage,
    so masks predicted for its unlabelled cases are what the diffusion stage reads."""
    from lad_fast.train.data import how_to_add_masks, training_dataset
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import check_holdout, train_vqgan

    check_holdout(holdout)
    t0 = time.perf_counter()
    dataset = training_dataset(data, cfg)
    if len(dataset) == 0:
        raise InputError(f"{dataset.path}: the prepared dataset has no cases")
    labelled = set(dataset.labelled_indices())
    unlabelled = [cid for i, cid in enumerate(dataset.case_ids) if i not in labelled]
    if len(unlabelled) == len(dataset):  # refused before phase 1, so nothing is trained in vain
        raise InputError(
            f"{dataset.path}: no case has a mask, so the organ segmenter has nothing to learn from (checked "
            "before the VQ-GAN phase, nothing trained); " + how_to_add_masks(dataset.path)
        )
    common = dict(data=dataset, steps=steps, batch=batch, resume=resume, force=force, device=device)

    say(f"phase 1: VQ-GAN with the locality loss -> {run / 'vqgan'}")
    train_vqgan(run, cfg, holdout=holdout, **common)

    if unlabelled:
        from lad_fast.train.segmenter import predict_masks, train_segmenter

        say(f"masks: {len(unlabelled)} case(s) without a mask; training the organ segmenter")
        train_segmenter(run, cfg, **common)
        predict_masks(run, dataset, device=device)

    say(f"phase 2: conditional latent diffusion -> {run / 'diffusion'}")
    train_diffusion(run, cfg, vqgan_run=run, **common)
    say(f"done in {time.perf_counter() - t0:.0f} s; generate with `lad-fast generate --run {run}`")
    return run
