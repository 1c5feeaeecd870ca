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
    allow_empty: bool = False,
    keep_going: bool = False,
) -> list[str]:
    """Predict canonical masks for the cases of the prepared dataset ``data`` (open, or a folder) that have
    none (every case with ``force``) with the segmenter of ``run``; returns the ids of the cases written.

    A case prepared without a mask (its slice window is the centred one,
    :func:`lad_fast.data.masks.window_of`) is predicted over the whole height of its source image
    (:func:`lad_fast.data.masks.source_column`), and its slice window is chosen again from that
    prediction: image and mask are re-cropped together and the case rewritten whole
    (:func:`lad_fast.data.masks.recrop_case`), as if they had been prepared together. This changes the
    case's image, so it is done before any model trains on the dataset (``lad-fast prepare
    --segmenter``, or ``lad-fast predict-masks`` before ``train``; the main job predicts before its
    VQ-GAN phase). A case whose window is already set is predicted on its prepared image.

    Each prediction is checked twice, in this order, and not recorded when it fails (the case keeps no
    mask, and its image and window are untouched):

    1. plausible: some window of the preset depth in what the segmenter saw (the whole height, or the
       prepared image) has organs on at least ``min_foreground`` of its voxels. Less is no abdomen
       found (typically an undertrained segmenter, or an image that is not an abdominal CT); never
       recorded, ``allow_empty`` or not.
    2. window organs: the prediction holds one of ``geometry.window_organs`` inside its final window.
       With ``allow_empty`` such a prediction is written with an
       :class:`~lad_fast.data.masks.EmptyMaskWarning` instead
       (:func:`lad_fast.data.masks.check_window_organs`).

    The cases of the others are written first; then one message names the cases left without a mask and
    why. It is an InputError when a prediction failed check 2, or when no case got a mask; otherwise
    (only some implausible cases) a warning. With ``keep_going`` (the main job,
    :func:`lad_fast.train.pipeline.train_pipeline`) it is always a warning: those cases stay unlabelled
    and training goes on with the cases that have a mask.

    Masks are written one case (re-cropped) or one batch of cases at a time, each atomically with its
    ``index.json``; an interrupted call leaves every case either untouched or complete, and a rerun
    continues. An open ``data`` is updated in place, so its holder sees the masks.
    """
    dataset = data if isinstance(data, PreparedDataset) else None
    folder = dataset.path if dataset is not None else Path(data)
    return _predict_masks(Path(run), folder, dataset, device, force, min_foreground, allow_empty, keep_going)


def predict_column(net: Segmenter, hu: np.ndarray, geometry: Any, device: torch.device | str) -> np.ndarray:
    """Labels of a whole-height column ``hu`` (D', H, W) HU at the preset grid -> (D', H, W) uint8.

    The segmenter sees windows of the preset depth D, as in training: consecutive windows from the top,
    the last one ending at the last slice (it overlaps the one before, whose labels it replaces there); a
    column shorter than D is padded with air and cut back.
    """
    from lad_fast.data.geometry import AIR_HU, hu_to_unit

    depth, total = int(geometry.shape[0]), hu.shape[0]
    if total < depth:
        pad = np.full((depth - total, *hu.shape[1:]), AIR_HU, dtype=np.float32)
        return predict_column(net, np.concatenate([hu, pad]), geometry, device)[:total]
    starts = sorted({*range(0, total - depth + 1, depth), total - depth})
    windows = np.stack([hu_to_unit(hu[s : s + depth], geometry.hu_window) for s in starts])
    preds = predict_volumes(net, windows, device)
    out = np.zeros(hu.shape, dtype=np.uint8)
    for s, pred in zip(starts, preds, strict=True):
        out[s : s + depth] = pred
    return out


def _plausible(pred: np.ndarray, depth: int, min_foreground: float) -> bool:
    """Whether some ``depth``-slice window of ``pred`` (D', H, W) has organs on ``min_foreground`` of its
    voxels (a column shorter than ``depth`` counts as padded with background)."""
    per_slice = np.count_nonzero(pred.reshape(len(pred), -1), axis=1)
    best = np.convolve(per_slice, np.ones(min(depth, len(pred)), dtype=np.int64), mode="valid").max()
    return bool(best >= min_foreground * depth * pred[0].size)


@locks_folder("data", "predict-masks")  # one writer per prepared folder
def _predict_masks(
    run: Path,
    data: Path,
    dataset: PreparedDataset | None,
    device: str,
    force: bool,
    min_foreground: float,
    allow_empty: bool,
    keep_going: bool,
) -> list[str]:
    """:func:`predict_masks` holding the lock of the prepared folder ``data`` (``dataset``: it, if open)."""
    from dataclasses import replace as with_fields

    from lad_fast.data.geometry import window_case, window_organ_ids
    from lad_fast.data.masks import check_window_organs, recrop_case, source_column, window_of
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
    geom, depth, organs = dataset.geometry, int(dataset.geometry.shape[0]), window_organ_ids(dataset.geometry)
    labelled = set(dataset.labelled_indices())
    todo = [i for i in range(len(dataset)) if force or i not in labelled]
    source = f"predicted:{run}"
    recrop = [i for i in todo if window_of(dataset.entry(dataset.case_ids[i])) == "centre"]
    fixed = [i for i in todo if i not in set(recrop)]
    written: list[str] = []
    unrecorded: dict[str, list[str]] = {"implausible": [], "no window organs": []}

    def verdict(seen: np.ndarray, final: np.ndarray) -> str | None:
        """Why the prediction ``seen`` (what the segmenter labelled) with ``final`` (its final window)
        is not recorded, in the order of :func:`predict_masks`; None: record it."""
        if not _plausible(seen, depth, min_foreground):
            return "implausible"
        if not allow_empty and not np.isin(final, organs).any():
            return "no window organs"
        return None

    for i in track(recrop, "predict masks (whole height)"):
        case_id = dataset.case_ids[i]
        column = source_column(dataset, case_id)
        column = with_fields(column, mask=predict_column(net, column.hu, geom, dev))
        if why := verdict(column.mask, window_case(column, geom).mask):
            unrecorded[why].append(case_id)
            continue
        recrop_case(dataset, case_id, column, source, cfg.condition, allow_empty)  # warns if allowed empty
        written.append(case_id)
    chunks = [fixed[i : i + EVAL_BATCH] for i in range(0, len(fixed), EVAL_BATCH)]
    for chunk in track(chunks, "predict masks"):
        images = np.stack([np.asarray(dataset[i]["image"]) for i in chunk])
        preds = predict_volumes(net, images, dev)
        ids = [dataset.case_ids[i] for i in chunk]
        masks = {}
        for case_id, pred in zip(ids, preds, strict=True):
            if why := verdict(pred, pred):
                unrecorded[why].append(case_id)
                continue
            check_window_organs(pred, geom, f"case {case_id} ({source})", allow_empty)  # warns if allowed
            masks[case_id] = (pred, source)
        written += dataset.set_masks(masks, cfg.condition) if masks else []
    if any(unrecorded.values()):
        fatal = not keep_going and (bool(unrecorded["no window organs"]) or not written)
        _name_unrecorded(run, data, geom, unrecorded, len(todo), len(written), min_foreground, fatal)
    return written


def _name_unrecorded(
    run: Path,
    data: Path,
    geometry: Any,
    unrecorded: dict[str, list[str]],
    of: int,
    written: int,
    min_foreground: float,
    fatal: bool,
) -> None:
    """One message naming the cases whose prediction was not recorded (``unrecorded``: the ids per
    reason of :func:`_predict_masks`) and what to do: InputError when ``fatal``, else a warning."""

    def cases(ids: list[str]) -> str:
        return f"{len(ids)} of {of} case(s) ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"

    organs = ", ".join(geometry.window_organs)
    what = []
    if unrecorded["implausible"]:
        what.append(
            f"no organ, or organs on fewer than {min_foreground:.1%} of the voxels, for "
            + cases(unrecorded["implausible"])
        )
    if unrecorded["no window organs"]:
        what.append(
            f"none of the organs the slice window is chosen by ({organs}) inside that window for "
            + cases(unrecorded["no window organs"])
        )
    others = f", the other {written} got theirs" if written else ""
    message = (
        f"the segmenter of {run} predicted {' and '.join(what)}; they keep no mask{others}; train the "
        "segmenter longer (lad-fast train segmenter --resume --steps N), check that these are abdominal "
        f"CTs, or give them masks with `lad-fast import-masks {data} MASKS`"
    )
    if unrecorded["no window organs"]:
        message += (
            f"; to write the predictions without {organs} anyway: "
            f"`lad-fast predict-masks {data} --run {run} --allow-empty`"
        )
    if fatal:
        raise InputError(message)
    import warnings

    warnings.warn(message, stacklevel=5)  # at the caller of predict_masks


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
