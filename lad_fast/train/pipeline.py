"""The main job: ``lad-fast train`` with no subcommand runs every stage of Lad in order.

1. data: the given prepared dataset, or the built-in phantoms (generated and prepared once, cached);
2. masks: when some cases have no mask, the organ segmenter is trained on the labelled cases and
   predicts the rest (Lad's "predicted organ masks"). A case prepared without a mask gets its slice
   window chosen again from the prediction, which rewrites its image
   (:func:`lad_fast.train.segmenter.predict_masks`), so this comes before any model reads the images:
   the VQ-GAN records the hash of the images it trained on, and a resumed phase 1 refuses changed data.
   A prediction that is not recorded (no organ, or none of the window organs inside the window, where
   ``lad-fast predict-masks`` stops) does not stop the job: one warning line names those cases, which
   keep no mask and their window, and training goes on with the cases that have a mask. Recording such
   a prediction instead would condition the diffusion model on a mask that misses the organs the
   locality loss and the slice window are about; the warning names the commands that give the cases a
   mask;
3. phase 1: the VQ-GAN with the locality loss;
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

    if unlabelled:  # before phase 1: predicting re-crops the images (see the module doc)
        from lad_fast.train.segmenter import predict_masks, train_segmenter

        say(f"masks: {len(unlabelled)} case(s) without a mask; training the organ segmenter")
        train_segmenter(run, cfg, **common)
        predict_masks(run, dataset, device=device, keep_going=True)  # refused predictions: warned

    say(f"phase 1: VQ-GAN with the locality loss -> {run / 'vqgan'}")
    train_vqgan(run, cfg, holdout=holdout, **common)

    say(f"phase 2: conditional latent diffusion -> {run / 'diffusion'}")
    train_diffusion(run, cfg, vqgan_run=run, **common)
    seconds = time.perf_counter() - t0
    say(f"done in {seconds:.0f} s; generate with `lad-fast generate --run {run} --out generated`")
    return run
