"""The built-in organ segmenter: training, and predicting masks for unlabelled cases.

Lad conditions its diffusion model on *predicted* organ masks (``docs/lad.md``, phase 2). When a
prepared dataset holds unlabelled cases, :func:`train_segmenter` learns the canonical organs from its
labelled cases and :func:`predict_masks` writes a mask and structure condition for the others.

* Training reads the labelled cases of the train split (:func:`lad_fast.train.data.split_indices`) and
  runs :func:`lad_fast.train.loop.train` as model ``"segmenter"``; at the end, per-organ Dice on the
  held-out split is logged (``log.jsonl`` event ``"eval"``).
* Augmentation is light and side-preserving: intensity jitter, CT-like noise and small integer shifts.
  There are no flips: a left-right flip turns a right kidney into a left one (anatomy has a side), and
  the canonical grid fixes the other axes too.
* ``meta.json`` stores the organ vocabulary (:data:`CANONICAL_ORGANS`);
  :func:`lad_fast.runs.loading.load_segmenter` refuses a checkpoint trained for another one, since its output
  channels would mean other organs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.config import LadConfig, SegmenterConfig, TrainConfig, config_from_dict, config_to_dict
from lad_fast.data.labels import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.models.segmenter import Segmenter, dice_loss, dice_per_class
from lad_fast.runs.loading import load_segmenter, predict_volumes
from lad_fast.train.data import PreparedBatches, how_to_add_masks, split_indices, training_dataset
from lad_fast.train.loop import Job, Phase, Setup, TrainResult, train
from lad_fast.train.schedule import make_adamw, make_scheduler
from lad_fast.utils.lock import locks_folder

MODEL = "segmenter"
# Augmentation, in HU (CT intensities are absolute, so jitter stays well below organ contrasts of
# 10-60 HU) and voxels. Shifts are small next to the organs' positional spread between patients.
JITTER_SCALE = 0.02  # HU' = HU * (1 + U(-s, s)) + U(-o, o) + N(0, noise)
JITTER_OFFSET_HU = 5.0
JITTER_NOISE_HU = 3.0
SHIFT_VOXELS = (1, 2, 2)  # at most this many voxels along (D, H, W), either way
EVAL_BATCH = 4
# Organs cover ~5-15% of an abdominal crop (12% in the tiny phantoms); under 0.5% a prediction is not a mask.
MIN_FOREGROUND = 0.005


# -------------------------------------------------------------------------------------------- batches


def _shift(a: torch.Tensor, shift: Sequence[int], fill: float) -> torch.Tensor:
    """Move ``a`` (..., D, H, W) by integer ``shift`` voxels; uncovered voxels hold ``fill`` (no wrap)."""
    out = torch.full_like(a, fill)
    src, dst = [Ellipsis], [Ellipsis]
    for s, n in zip(shift, a.shape[-3:], strict=True):
        src.append(slice(max(-s, 0), n - max(s, 0)))
        dst.append(slice(max(s, 0), n - max(-s, 0)))
    out[tuple(dst)] = a[tuple(src)]
    return out


@dataclass
class SegmenterBatches:
    """``batches(step, rank, world) -> {"image", "mask"}``: labelled training cases with augmentation.

    ``image`` (B, 1, D, H, W) float32 in [-1, 1] of ``hu_window``; ``mask`` (B, D, H, W) int64 canonical
    ids. A pure function of (seed, step, rank), so a resumed run draws the same batches.
    """

    source: PreparedBatches
    seed: int
    hu_window: tuple[float, float]
    augment: bool = True

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        from lad_fast.utils.distributed import step_generator

        batch = self.source(step, rank, world)
        image, mask = batch["image"], batch["mask"]
        if not self.augment:
            return {"image": image, "mask": mask}
        g = step_generator(self.seed + 1, step, rank)  # another stream than the batch indices
        b = image.shape[0]
        lo, hi = self.hu_window
        half = (hi - lo) / 2.0
        hu = (image + 1.0) * half + lo
        scale = 1.0 + JITTER_SCALE * (2 * torch.rand(b, generator=g) - 1)
        offset = JITTER_OFFSET_HU * (2 * torch.rand(b, generator=g) - 1)
        noise = JITTER_NOISE_HU * torch.randn(image.shape, generator=g)
        hu = hu * scale.view(b, 1, 1, 1, 1) + offset.view(b, 1, 1, 1, 1) + noise
        image = ((hu.clamp(lo, hi) - lo) / half - 1.0).float()
        limits = torch.tensor(SHIFT_VOXELS)
        shifts = (torch.rand(b, 3, generator=g) * (2 * limits + 1)).floor().long() - limits
        images, masks = [], []
        for i in range(b):
            s = shifts[i].tolist()
            images.append(_shift(image[i], s, -1.0))  # -1: the window's floor, air
            masks.append(_shift(mask[i], s, 0))
        return {"image": torch.stack(images), "mask": torch.stack(masks)}


# --------------------------------------------------------------------------------------------- train


def labelled_split(dataset: PreparedDataset) -> tuple[list[int], list[int]]:
    """(train, held-out) dataset indices among the cases that have a mask; InputError when none does."""
    labelled = dataset.labelled_indices()
    if not labelled:
        raise InputError(
            f"{dataset.path}: no case has a mask, so the segmenter has nothing to learn from; "
            + how_to_add_masks(dataset.path)
        )
    train_pos, val_pos = split_indices(len(labelled))
    return [labelled[i] for i in train_pos], [labelled[i] for i in val_pos]


def _model_config(cfg: SegmenterConfig) -> dict[str, Any]:
    return {"segmenter": config_to_dict(cfg), "num_classes": NUM_CLASSES}


def evaluate_segmenter(
    net: Segmenter, dataset: PreparedDataset, indices: Sequence[int], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Per-organ Dice of ``net`` on the cases ``indices`` of ``dataset`` (they must have masks).

    Returns ``{"dice": {organ: mean over cases holding the organ}, "dice_pooled": {organ: Dice over all
    voxels of the cases}, "cases": n}``. Organs absent from every case are left out.
    """
    per_case: dict[str, list[float]] = {}
    inter = np.zeros(NUM_CLASSES)
    total = np.zeros(NUM_CLASSES)
    for start in range(0, len(indices), EVAL_BATCH):
        items = [dataset[i] for i in indices[start : start + EVAL_BATCH]]
        if any(it["mask"] is None for it in items):
            raise InputError(f"{dataset.path}: evaluation needs cases with masks")
        pred = predict_volumes(net, np.stack([np.asarray(it["image"]) for it in items]), device)
        for p, it in zip(pred, items, strict=True):
            truth = np.asarray(it["mask"])
            d = dice_per_class(torch.from_numpy(p), torch.from_numpy(truth.astype(np.uint8)), NUM_CLASSES)
            for c in range(1, NUM_CLASSES):
                if (truth == c).any():
                    per_case.setdefault(CANONICAL_ORGANS[c], []).append(float(d[c]))
                inter[c] += np.count_nonzero((p == c) & (truth == c))
                total[c] += np.count_nonzero(p == c) + np.count_nonzero(truth == c)
    return {
        "dice": {organ: round(float(np.mean(v)), 4) for organ, v in per_case.items()},
        "dice_pooled": {
            CANONICAL_ORGANS[c]: round(float(2 * inter[c] / total[c]), 4)
            for c in range(1, NUM_CLASSES)
            if CANONICAL_ORGANS[c] in per_case
        },
        "cases": len(indices),
    }


@dataclass(frozen=True)
class SegmentationLoss:
    """The segmenter's phase loss, ``loss(modules, batch, step)``: Dice + cross-entropy
    (:func:`lad_fast.models.segmenter.dice_loss`) of ``modules["model"]`` on the batch, on ``device``."""

    device: torch.device

    def __call__(self, mods: Mapping[str, torch.nn.Module], batch: dict[str, torch.Tensor], step: int):
        logits = mods["model"](batch["image"].to(self.device))
        return dice_loss(logits, batch["mask"].to(self.device)), {}


@dataclass
class _Report:
    """What a segmenter run shows besides its losses: previews of the first held-out case, and after the
    last step the held-out Dice of the saved weights (the EMA ones when there are any)."""

    setup: Setup
    net: Segmenter
    dataset: PreparedDataset
    train_idx: list[int]
    val_idx: list[int]
    steps: int

    def preview(self, step: int, run_path: Path) -> None:
        from lad_fast.utils.atomic import atomic_path

        item = self.dataset[self.val_idx[0]]
        pred = predict_volumes(self.net, np.asarray(item["image"])[None], self.setup.device)[0]
        img = render_prediction(item["image"], pred, item["mask"], self.dataset.geometry, f"step {step}")
        with atomic_path(run_path / "previews" / f"segmenter-{step:08d}.png", suffix=".png") as tmp:
            img.save(tmp, format="PNG")

    def finish(self, result: TrainResult) -> None:
        if result.step < self.steps:  # stopped early (stop_at): no final report yet
            return
        dev = self.setup.device
        eval_net, _ = load_segmenter(self.setup.run.path, device=dev)
        scores = evaluate_segmenter(eval_net, self.dataset, self.val_idx, dev)
        held_out = not set(self.val_idx) & set(self.train_idx)
        self.setup.run.log(
            {"model": MODEL, "event": "eval", "step": result.step, "held_out": held_out, **scores}
        )


def _segmenter_job(
    setup: Setup,
    cfg: LadConfig,
    tcfg: TrainConfig,
    dataset: PreparedDataset,
    split: tuple[list[int], list[int]],
) -> Job:
    """What the loop trains: the segmenter (initial weights from the seed), AdamW with its schedule, and
    augmented batches of the labelled training cases; ``split`` is (train, held-out) dataset indices."""
    train_idx, val_idx = split
    with setup.initial_weights():
        net = Segmenter(cfg.segmenter, NUM_CLASSES).to(setup.device)
    opt = make_adamw(net, tcfg)
    source = PreparedBatches(dataset, tcfg.batch_size, tcfg.seed, train_idx, require_mask=True)
    report = _Report(setup, net, dataset, train_idx, val_idx, tcfg.steps)
    meta = {
        "preset": cfg.preset,
        "data_hash": dataset.content_hash(),
        "data": str(dataset.path.resolve()),
        "organs": list(CANONICAL_ORGANS),
        "train_cases": len(train_idx),
        "held_out_cases": [dataset.case_ids[i] for i in val_idx],
    }
    return Job(
        {"model": net},
        [Phase("model", opt, SegmentationLoss(setup.device), scheduler=make_scheduler(opt, tcfg))],
        SegmenterBatches(source, tcfg.seed, dataset.geometry.hu_window),
        model_config=_model_config(cfg.segmenter),
        meta=meta,
        preview=report.preview,
        finish=report.finish,
    )


def train_segmenter(
    run: Path,
    cfg: LadConfig,
    data: PreparedDataset | Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    stop_at: int | None = None,
    batch: int | None = None,
) -> TrainResult:
    """Train the segmenter of ``cfg`` on the labelled cases of a prepared dataset into ``run/segmenter/``.

    data: a prepared dataset at ``cfg.preset``, open or a folder (default: the built-in phantoms;
        :func:`lad_fast.train.data.training_dataset`); only cases with a mask are used, the train split
        for training and the held-out split for the Dice logged at the end.
    steps, batch: override ``cfg.segmenter_train.steps`` and ``batch_size``. resume / force / device /
    stop_at: see ``lad_fast.train.loop``.
    """
    tcfg = cfg.segmenter_train.overridden(steps, batch)
    dataset = training_dataset(data, cfg)
    split = labelled_split(dataset)
    build = partial(_segmenter_job, cfg=cfg, tcfg=tcfg, dataset=dataset, split=split)
    return train(
        Path(run), cfg, MODEL, tcfg, build, resume=resume, force=force, device=device, stop_at=stop_at
    )


# ------------------------------------------------------------------------------------------- predict


def predict_masks(
    run: Path,
    data: PreparedDataset | Path,
    device: str = "auto",
    force: bool = False,
    min_foreground: float = MIN_FOREGROUND,
) -> list[str]:
    """Predict canonical masks for the cases of the prepared dataset ``data`` (open, or a folder) that have
    none (every case with ``force``) with the segmenter of ``run``; returns the ids of the cases written.

    A prediction with organs on fewer than ``min_foreground`` of the voxels (all background, typically an
    undertrained segmenter or an image that is not an abdominal CT) is not recorded: a warning names
    those cases, and InputError is raised when no case got a plausible mask.

    Masks are written by :meth:`PreparedDataset.set_masks` (structure condition of the run's ``condition``
    config, ``mask_source: "predicted:<run>"``), one batch of cases at a time: each batch's arrays are
    written atomically, then ``index.json`` once; an interrupted call leaves every case either untouched
    or complete, and a rerun continues. An open ``data`` is updated in place, so its holder sees the masks.
    """
    dataset = data if isinstance(data, PreparedDataset) else None
    folder = dataset.path if dataset is not None else Path(data)
    return _predict_masks(Path(run), folder, dataset, device, force, min_foreground)


@locks_folder("data", "predict-masks")  # one writer per prepared folder
def _predict_masks(
    run: Path, data: Path, dataset: PreparedDataset | None, device: str, force: bool, min_foreground: float
) -> list[str]:
    """:func:`predict_masks` holding the lock of the prepared folder ``data`` (``dataset``: it, if open)."""
    from lad_fast.utils.devices import resolve_device
    from lad_fast.utils.progress import track

    dev = resolve_device(device)
    net, meta = load_segmenter(run, device=dev)
    cfg = config_from_dict(meta["config"])
    dataset = training_dataset(dataset if dataset is not None else data, cfg)
    if tuple(dataset.geometry.shape) != tuple(cfg.geometry.shape):
        raise InputError(
            f"{data}: prepared at shape {dataset.geometry.shape}, the segmenter of {run} expects "
            f"{cfg.geometry.shape}; re-prepare the dataset at preset {cfg.preset!r}"
        )
    labelled = set(dataset.labelled_indices())
    todo = [i for i in range(len(dataset)) if force or i not in labelled]
    written: list[str] = []
    implausible: list[str] = []  # predictions too small to be an abdomen's organs: never recorded
    chunks = [todo[i : i + EVAL_BATCH] for i in range(0, len(todo), EVAL_BATCH)]
    for chunk in track(chunks, "predict masks"):
        images = np.stack([np.asarray(dataset[i]["image"]) for i in chunk])
        preds = predict_volumes(net, images, dev)
        ids = [dataset.case_ids[i] for i in chunk]
        masks = {}
        for case_id, pred in zip(ids, preds, strict=True):
            if np.count_nonzero(pred) < min_foreground * pred.size:
                implausible.append(case_id)
            else:
                masks[case_id] = (pred, f"predicted:{run}")
        written += dataset.set_masks(masks, cfg.condition) if masks else []
    if implausible:
        _refuse_implausible(run, data, implausible, len(todo), min_foreground, fatal=not written)
    return written


def _refuse_implausible(
    run: Path, data: Path, cases: list[str], of: int, min_foreground: float, fatal: bool
) -> None:
    """Name the ``cases`` whose prediction was too small to record: InputError when ``fatal`` (no case
    got a mask), else a warning."""
    what = (
        f"the segmenter of {run} predicted no organ, or organs on fewer than {min_foreground:.1%} of the "
        f"voxels, for {len(cases)} of {of} case(s) ({', '.join(cases[:5])}"
        f"{', ...' if len(cases) > 5 else ''}); they keep no mask"
    )
    hint = (
        "train the segmenter longer (lad-fast train segmenter --resume --steps N), check that these are "
        f"abdominal CTs, or give them masks with `lad-fast import-masks {data} MASKS`"
    )
    if fatal:
        raise InputError(f"{what}; {hint}")
    import warnings

    warnings.warn(f"{what}; {hint}", stacklevel=5)  # at the caller of predict_masks


# ------------------------------------------------------------------------------------------- preview


def render_prediction(
    image: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None,
    geometry: Any,
    title: str = "",
):
    """PIL image: the case's three planes with true outlines (top, when given) and predicted ones below.

    image (D, H, W) in [-1, 1] of ``geometry.hu_window``; pred, truth (D, H, W) canonical ids.
    """
    from PIL import Image

    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.preview.render import render_slices

    hu = unit_to_hu(np.asarray(image, dtype=np.float32), geometry.hu_window)
    names = dict(enumerate(CANONICAL_ORGANS))
    spacing = tuple(geometry.spacing)
    panels = []
    if truth is not None:
        panels.append(
            render_slices(hu, np.asarray(truth), spacing, title=f"{title} true".strip(), names=names)
        )
    panels.append(
        render_slices(hu, np.asarray(pred), spacing, title=f"{title} predicted".strip(), names=names)
    )
    width = max(p.width for p in panels)
    canvas = Image.new("RGB", (width, sum(p.height for p in panels)))
    y = 0
    for p in panels:
        canvas.paste(p, (0, y))
        y += p.height
    return canvas
