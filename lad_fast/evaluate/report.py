"""``lad-fast evaluate``: realism, diversity and mask fidelity of a generated dataset, in one report.

:func:`evaluate` reads both sides onto the synthetic grid (:mod:`lad_fast.evaluate.datasets`), extracts
features (:func:`lad_fast.evaluate.features.make_extractor`), and returns a JSON-ready dict with:

* ``realism``: FID and MMD (linear and Gaussian kernels) of synthetic against real features;
* ``references``: the same metrics for two reference generators, so a number can be read without a
  paper: ``real_vs_real`` (the real set split in two halves, even and odd positions: the floor a
  generator as good as the data reaches at this sample size) and ``trivial`` (the ceiling: the voxel-wise
  mean of the real volumes plus Gaussian noise with the real voxel-wise standard deviation, clipped to
  [-1, 1], as many volumes as synthetic ones, seed 0: right intensities everywhere, no anatomy);
* ``diversity``: mean pairwise MS-SSIM among synthetic volumes (and among real ones, for reference);
* ``fidelity``: per-organ Dice, organ volume error and structure error of the segmented synthetic
  volumes against their conditioning masks, with the shuffled baseline and the real ceiling
  (:mod:`lad_fast.evaluate.fidelity`); the segmentations come from lad-fast's segmenter
  (:mod:`lad_fast.evaluate.segmenting`), or from an external segmenter's files (``segmentations``,
  :mod:`lad_fast.evaluate.external`): then the real ceiling needs that segmenter's files for the real
  volumes too (``real_segmentations``), else it is reported as skipped, and no lad-fast segmenter is
  loaded unless the features need it;
* ``intensity``: per-organ HU median and IQR and HU histograms, real (labels) vs synthetic (conditioning
  masks);
plus sample counts, the extractor's name and weights hash, the segmenter's checkpoint hash and versions.
Sample sizes matter: FID is biased upwards at small N, so compare numbers at equal counts.

This file is the one orchestration of every measurement and its references, so the order in which
volumes are read, segmented and scored is in one place; :func:`evaluate` reads as its steps (inputs,
models, volumes, features, realism, diversity, fidelity, intensity, report), and the measures themselves
live in metrics, features, fidelity and external.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lad_fast.errors import ConfigError, InputError

if TYPE_CHECKING:
    from lad_fast.evaluate.datasets import Grid, VolumeSet
    from lad_fast.evaluate.external import ExternalSegmentations
    from lad_fast.evaluate.segmenting import Segmenting

TRIVIAL_SEED = 0
# HU histograms span soft tissue (organs lie between fat, about -100, and contrast-filled vessels, about
# 300); voxels outside are counted in the end bins. Intersected with the window the volumes went through.
HISTOGRAM_HU = (-250.0, 350.0)


# ------------------------------------------------------------------------------------- measures


def check_counts(n_real: int, n_synthetic: int, real: Path, synthetic: Path) -> None:
    """FID needs a covariance on each side: at least 2 volumes each."""
    for name, n, path in (("real", n_real, real), ("synthetic", n_synthetic, synthetic)):
        if n < 2:
            raise InputError(
                f"{path}: {n} {name} volume(s); FID and MMD are undefined with fewer than 2 volumes on a "
                "side (a covariance needs 2): pass at least 2 real and 2 synthetic volumes"
            )


def _features(extractor: Any, images: np.ndarray, ids: list[str], side: str, batch: int) -> torch.Tensor:
    """(N, D, H, W) in [-1, 1] -> (N, F) float32 features; InputError naming a volume with NaN features."""
    from lad_fast.utils.progress import track

    out = []
    for start in track(range(0, len(images), batch), f"features {side}"):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch], dtype=np.float32))[:, None]
        out.append(torch.as_tensor(extractor(x)).detach().float().cpu())
    feats = torch.cat(out)
    bad = (~torch.isfinite(feats)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise InputError(
            f"{extractor.name} features of {len(bad)} {side} volume(s) are not finite (first: "
            f"{ids[bad[0]]}); check the volumes and the feature weights (--weights) for NaN or Inf values"
        )
    return feats


def _distances(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    from lad_fast.evaluate.metrics import fid, mmd

    return {
        "fid": round(float(fid(real, fake)), 4),
        "mmd_linear": round(float(mmd(real, fake, kernel="linear")), 6),
        "mmd_gaussian": round(float(mmd(real, fake, kernel="gaussian")), 6),
        "volumes": [len(real), len(fake)],
    }


def trivial_volumes(real: np.ndarray, n: int, seed: int = TRIVIAL_SEED) -> np.ndarray:
    """The trivial generator: voxel-wise mean of ``real`` (N, D, H, W) plus Gaussian noise with the real
    voxel-wise std, clipped to [-1, 1]; (n, D, H, W) float32."""
    mean, std = real.mean(axis=0), real.std(axis=0)
    noise = np.random.default_rng(seed).standard_normal((n, *real.shape[1:]), dtype=np.float32)
    return np.clip(mean + std * noise, -1.0, 1.0).astype(np.float32)


def _diversity(images: np.ndarray) -> float:
    from lad_fast.evaluate.metrics import diversity

    return round(float(diversity(torch.from_numpy(np.ascontiguousarray(images))[:, None])), 4)


def _conditioning_fidelity(pred: np.ndarray, syn: Any, cond: Any, organs: list[str]) -> dict[str, Any]:
    """Segmentations ``pred`` against their conditioning masks, and against a deranged set of them."""
    from lad_fast.evaluate.fidelity import derangement, mask_fidelity

    perm = derangement(syn.groups)
    return {
        "synthetic": mask_fidelity(pred, syn.masks, cond, organs),
        "shuffled": mask_fidelity(pred, syn.masks[perm], cond, organs),
        "derangement": [int(p) for p in perm],
    }


def synthetic_fidelity(
    synthetic: Path,
    *,
    segmenter: Path | None = None,
    segmentations: Path | None = None,
    segmentation_vocabulary: str | Path | None = None,
    strict: bool = False,
    device: str = "auto",
    organs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Mask and topology fidelity of a generated folder alone (no real volumes, no features).

    segmentations: a folder of an external segmenter's masks, one per volume id, scored instead of the
    lad-fast segmenter's (no segmenter is loaded); segmentation_vocabulary, strict: how their labels are
    read (:class:`lad_fast.evaluate.external.ExternalSegmentations`).
    organs: the organs scored and averaged (default: those present in the conditioning masks).
    Returns ``{"organs", "synthetic", "shuffled", "derangement", "volumes", "segmenter", "segmentations"}``
    with the :func:`lad_fast.evaluate.fidelity.mask_fidelity` blocks that :func:`evaluate` reports
    (``segmenter`` None with external segmentations, ``segmentations`` None without).
    """
    from lad_fast.evaluate.datasets import check_masks, read_synthetic, synthetic_ids
    from lad_fast.evaluate.external import ExternalSegmentations
    from lad_fast.evaluate.fidelity import present_organs
    from lad_fast.evaluate.segmenting import load_segmenting, run_settings, segmenter_record
    from lad_fast.runs import loading

    synthetic = Path(synthetic)
    ids, records = synthetic_ids(synthetic)
    if len(ids) < 2:
        raise InputError(f"{synthetic}: {len(ids)} volume(s); the shuffled baseline needs at least 2")
    check_masks(synthetic, ids)
    ext = ExternalSegmentations.open_optional(segmentations, segmentation_vocabulary, strict)
    if ext is None:
        seg = load_segmenting(segmenter, records, synthetic, device)
        syn, _ = read_synthetic(synthetic, ids, seg.window, with_masks=True)
        pred, cond = loading.predict_volumes(seg.net, syn.images, seg.device), seg.cond
    else:
        from lad_fast.evaluate.external import read_synthetic_segmentations

        ext.paths(ids, "synthetic")  # a missing file is named before any volume is read
        seg = None
        window, cond, _ = run_settings(records)
        syn, grid = read_synthetic(synthetic, ids, window, with_masks=True)
        pred = read_synthetic_segmentations(ext, syn.ids, syn.affines, grid[0])
    organs = list(organs) if organs is not None else present_organs(syn.masks)
    return {
        "organs": organs,
        **_conditioning_fidelity(pred, syn, cond, organs),
        "volumes": len(syn),
        "segmenter": segmenter_record(seg),
        "segmentations": ext.describe() if ext is not None else None,
    }


# ------------------------------------------------------------------------------------- evaluate, by step


class _Laps:
    """Seconds per step of :func:`evaluate`: :meth:`lap` charges the time since the previous lap."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t0 - sum(self.timings.values()), 2)


@dataclass(frozen=True)
class _Inputs:
    """The two sides, checked without reading a volume: ids, manifest lines, external segmentations."""

    real: Path
    synthetic: Path
    real_ids: list[str]
    syn_ids: list[str]
    records: dict[str, dict[str, Any]]
    ext: ExternalSegmentations | None
    ext_real: ExternalSegmentations | None


def _check_inputs(
    real: Path,
    synthetic: Path,
    *,
    features: str,
    fidelity: bool,
    segmentations: Path | None,
    real_segmentations: Path | None,
    segmentation_vocabulary: str | Path | None,
    strict: bool,
) -> _Inputs:
    """Cheap checks first: counts and files, before any model or volume is loaded."""
    from lad_fast.evaluate.datasets import check_masks, real_ids, synthetic_ids
    from lad_fast.evaluate.external import ExternalSegmentations
    from lad_fast.evaluate.features import EXTRACTORS

    if features not in (*EXTRACTORS, "auto"):
        raise InputError(f"unknown features {features!r}; choose one of: auto, {', '.join(EXTRACTORS)}")
    syn_ids, records = synthetic_ids(synthetic)
    ids_real = real_ids(real)
    check_counts(len(ids_real), len(syn_ids), real, synthetic)
    if fidelity:
        check_masks(synthetic, syn_ids)
    if real_segmentations is not None and segmentations is None:
        raise ConfigError(
            "--real-segmentations scores an external segmenter's real ceiling; pass its masks of the "
            "synthetic volumes too (--segmentations DIR)"
        )
    ext = ExternalSegmentations.open_optional(segmentations, segmentation_vocabulary, strict)
    ext_real = ExternalSegmentations.open_optional(real_segmentations, segmentation_vocabulary, strict)
    if ext is not None:  # missing files are named before any model or volume is loaded
        ext.paths(syn_ids, "synthetic")
    if ext_real is not None:
        ext_real.paths(ids_real, "real")
    return _Inputs(real, synthetic, ids_real, syn_ids, records, ext, ext_real)


@dataclass(frozen=True)
class _Models:
    """The segmenter (None when an external segmenter's files replace it and the features do not need
    it, or when the generator run holds none: then ``skipped`` says why the mask metrics are missing),
    the feature extractor, and the settings taken from the runs (see :mod:`lad_fast.evaluate.segmenting`)."""

    seg: Segmenting | None
    extractor: Any
    device: torch.device
    window: tuple[float, float]
    cond: Any
    generator_run: Path | None
    skipped: str | None = None


def _load_models(
    inputs: _Inputs,
    features: str,
    weights: Path | None,
    segmenter: Path | None,
    device: str,
    batch_size: int,
) -> _Models:
    """The segmenter when the fidelity or the features need it, and the feature extractor. With
    ``features="auto"``: the segmenter's encoder, or the generator's VQ-GAN when its run holds none."""
    from lad_fast.evaluate import segmenting as sg
    from lad_fast.evaluate.features import make_extractor
    from lad_fast.utils.devices import resolve_device

    seg: Segmenting | None = None
    skipped, seg_run = None, segmenter
    if features == "auto":
        seg_run = sg.find_segmenter(segmenter, inputs.records, inputs.synthetic)
        features = "segmenter" if seg_run is not None else "vqgan"
        gen = sg.generator_run(inputs.records)
        if seg_run is None and inputs.ext is None and gen is not None:
            skipped = sg.no_segmenter_note(gen)
    if (inputs.ext is None and skipped is None) or features == "segmenter":
        seg = sg.load_segmenting(seg_run, inputs.records, inputs.synthetic, device)
        dev, window, cond, gen_run = seg.device, seg.window, seg.cond, seg.generator_run
    else:
        dev = resolve_device(device)
        window, cond, gen_run = sg.run_settings(inputs.records)
    extractor = make_extractor(
        features, weights=weights, segmenter=seg.net if seg is not None and features == "segmenter" else None,
        vqgan=sg.load_generator_vqgan(inputs.records, inputs.synthetic, dev) if features == "vqgan" else None,
        device=dev, batch_size=batch_size,
    )  # fmt: skip
    return _Models(seg, extractor, dev, window, cond, gen_run, skipped)


@dataclass(frozen=True)
class _Volumes:
    """Both sides on the synthetic grid, and the external segmenter's masks of the synthetic ones."""

    syn: VolumeSet
    rea: VolumeSet
    grid: Grid
    ext_syn: np.ndarray | None


def _read_volumes(inputs: _Inputs, window: tuple[float, float], fidelity: bool) -> _Volumes:
    from lad_fast.evaluate.datasets import read_real, read_synthetic

    syn, grid = read_synthetic(inputs.synthetic, inputs.syn_ids, window, with_masks=fidelity)
    rea = read_real(inputs.real, grid, window, inputs.ext_real)
    ext_syn = None
    if inputs.ext is not None:
        from lad_fast.evaluate.external import read_synthetic_segmentations

        ext_syn = read_synthetic_segmentations(inputs.ext, syn.ids, syn.affines, grid[0])
    return _Volumes(syn, rea, grid, ext_syn)


def _all_features(extractor: Any, vols: _Volumes, batch: int) -> tuple[torch.Tensor, ...]:
    """(real, synthetic, trivial) features (N, F); the trivial volumes are made here."""
    f_real = _features(extractor, vols.rea.images, vols.rea.ids, "real", batch)
    f_syn = _features(extractor, vols.syn.images, vols.syn.ids, "synthetic", batch)
    n = len(vols.syn)
    trivial = trivial_volumes(vols.rea.images, n)
    f_triv = _features(extractor, trivial, [f"trivial_{i}" for i in range(n)], "trivial", batch)
    return f_real, f_syn, f_triv


def _realism(
    f_real: torch.Tensor, f_syn: torch.Tensor, f_triv: torch.Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(realism, references): synthetic against real, and the real-vs-real floor and trivial ceiling."""
    halves = (f_real[0::2], f_real[1::2])
    floor: dict[str, Any] = (
        _distances(*halves)
        if min(len(h) for h in halves) >= 2
        else {"skipped": f"needs at least 4 real volumes, got {len(f_real)}"}
    )
    references = {
        "real_vs_real": {"definition": "real volumes at even positions vs odd positions", **floor},
        "trivial": {
            "definition": "voxel-wise real mean + Gaussian noise of the real voxel-wise std, clipped, "
            f"seed {TRIVIAL_SEED}",
            **_distances(f_real, f_triv),
        },
    }
    return _distances(f_real, f_syn), references


def _diversity_block(vols: _Volumes) -> dict[str, Any]:
    from lad_fast.evaluate.metrics import ms_ssim_settings

    return {
        "synthetic": _diversity(vols.syn.images),
        "real": _diversity(vols.rea.images),
        "definition": "mean pairwise MS-SSIM (higher: less diverse)",
        "ms_ssim": dict(
            zip(("kernel_size", "weights"), _jsonable(ms_ssim_settings(vols.grid[0])), strict=True)
        ),
    }


@dataclass(frozen=True)
class _Segmented:
    """Segmentations of both sides (the segmenter's, or the external segmenter's files; ``real`` None
    when there are none) and the organs scored."""

    synthetic: np.ndarray | None
    real: np.ndarray | None
    organs: list[str]


def _segment(vols: _Volumes, models: _Models, fidelity: bool) -> _Segmented:
    from lad_fast.evaluate.fidelity import present_organs
    from lad_fast.runs import loading

    syn, rea = vols.syn, vols.rea
    real_masks = rea.masks[rea.masked] if rea.masks is not None else None
    if models.seg is None and vols.ext_syn is None:  # no segmenter: nothing segmented
        return _Segmented(None, None, present_organs(syn.masks, real_masks))
    if vols.ext_syn is None:
        assert models.seg is not None
        pred_syn = loading.predict_volumes(models.seg.net, syn.images, models.device)
        pred_real = loading.predict_volumes(models.seg.net, rea.images, models.device) if len(rea) else None
    else:
        pred_syn, pred_real = vols.ext_syn, rea.segmentations
    organs = present_organs(syn.masks, real_masks) if fidelity else present_organs(pred_syn, real_masks)
    return _Segmented(pred_syn, pred_real, organs)


def _fidelity_block(
    vols: _Volumes, pred: _Segmented, cond: Any, fidelity: bool, skipped: str | None = None
) -> dict[str, Any]:
    """Conditioning fidelity with its shuffled baseline (``fidelity``), and the real ceiling, with a
    warning when the ceiling is too low to score masks; ``skipped``: why nothing was segmented."""
    from lad_fast.evaluate.fidelity import ceiling_warning, mask_fidelity

    rea, organs = vols.rea, pred.organs
    block: dict[str, Any] = {"organs": organs}
    if pred.synthetic is None:
        return {**block, "skipped": skipped or "nothing was segmented", "real": {"skipped": "no segmenter"}}
    if fidelity:
        block.update(_conditioning_fidelity(pred.synthetic, vols.syn, cond, organs))
    if rea.masks is None:
        block["real"] = {"skipped": "the real volumes have no labels"}
    elif pred.real is None:
        block["real"] = {
            "skipped": "the synthetic segmentations come from an external segmenter; its real ceiling needs "
            "its segmentations of the real volumes (--real-segmentations DIR)"
        }
    else:
        block["real"] = mask_fidelity(pred.real[rea.masked], rea.masks[rea.masked], cond, organs)
        warning = ceiling_warning(block["real"])
        if warning:
            block["warning"] = warning
    return block


def _intensity_block(
    vols: _Volumes, pred: _Segmented, window: tuple[float, float], external: bool
) -> dict[str, Any]:
    """Per-organ HU statistics and histograms, real against synthetic."""
    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.evaluate.fidelity import hu_histograms, hu_statistics

    syn, rea, organs = vols.syn, vols.rea, pred.organs
    hu_real, hu_syn = unit_to_hu(rea.images, window), unit_to_hu(syn.images, window)
    span = (max(HISTOGRAM_HU[0], window[0]), min(HISTOGRAM_HU[1], window[1]))
    # Real HU inside the labels when every case has them, else inside the segmentations (external ones
    # when given), else inside the labels there are (unlabelled cases add no voxels).
    real_ref = rea.masks if rea.masks is not None and len(rea.masked) == len(rea) else pred.real
    if real_ref is None:
        real_ref = rea.masks if rea.masks is not None else np.zeros(rea.images.shape, dtype=np.uint8)
    syn_ref = syn.masks if syn.masks is not None else pred.synthetic
    if syn_ref is None:  # neither conditioning masks nor a segmenter
        syn_ref = np.zeros(syn.images.shape, dtype=np.uint8)
    predicted_by = "external segmentations" if external else "segmenter"
    real_by = "labels" if real_ref is rea.masks else predicted_by if real_ref is pred.real else "none"
    return {
        "real_masks": real_by,
        "synthetic_masks": "conditioning"
        if syn.masks is not None
        else predicted_by
        if pred.synthetic is not None
        else "none",
        "real": hu_statistics(hu_real, real_ref, organs),
        "synthetic": hu_statistics(hu_syn, syn_ref, organs),
        "histograms": {
            "real": hu_histograms(hu_real, real_ref, organs, span),
            "synthetic": hu_histograms(hu_syn, syn_ref, organs, span),
        },
    }


def _sources(inputs: _Inputs, models: _Models, vols: _Volumes, feature_dim: int) -> dict[str, Any]:
    """The report's record of what was compared and with what: sides, grid, features, segmenter."""
    from lad_fast.evaluate.segmenting import segmenter_record

    seg, ext = segmenter_record(models.seg), inputs.ext
    window, gen_run = models.window, models.generator_run
    return {
        "real": {"source": str(inputs.real), "volumes": len(vols.rea), "labelled": len(vols.rea.masked)},
        "synthetic": {
            "source": str(inputs.synthetic),
            "volumes": len(vols.syn),
            "run": str(gen_run) if gen_run else None,
        },
        "grid": {"shape": list(vols.grid[0]), "spacing": list(vols.grid[1]), "hu_window": list(window)},
        "features": {
            "extractor": models.extractor.name,
            "weights_hash": models.extractor.weights_hash,
            "dim": feature_dim,
        },
        "segmenter": seg,
        "segmentations": {
            **ext.describe(),
            "real_source": str(inputs.ext_real.folder) if inputs.ext_real is not None else None,
        }
        if ext is not None
        else {"source": "segmenter", **(seg or {})},
        "device": str(models.device),
    }


def evaluate(
    real: Path,
    synthetic: Path,
    *,
    features: str = "auto",
    weights: Path | None = None,
    segmenter: Path | None = None,
    segmentations: Path | None = None,
    segmentation_vocabulary: str | Path | None = None,
    real_segmentations: Path | None = None,
    strict: bool = False,
    fidelity: bool = True,
    device: str = "auto",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Evaluate the generated folder ``synthetic`` against the real volumes ``real``; see the module doc.

    real: a prepared dataset or NIfTI folder; synthetic: the output folder of ``lad-fast generate``;
    features: "segmenter" (encoder of the segmenter run), "vqgan" (encoder of the generator run's
    VQ-GAN), "medicalnet" or "radimagenet-2.5d" (both need ``weights``), or "auto": "segmenter" when a
    segmenter is found, else "vqgan" with the mask metrics skipped (see
    :mod:`lad_fast.evaluate.segmenting`); see :mod:`lad_fast.evaluate.features`.
    segmenter: the run holding the segmenter (default: the run that generated ``synthetic``);
    fidelity: score masks (needs ``masks/``).
    segmentations: an external segmenter's masks of the synthetic volumes (one per volume id), used
    instead of the segmenter's predictions; real_segmentations: the same segmenter's masks of the real
    volumes (per real case id), for the real ceiling; segmentation_vocabulary, strict: how their labels
    are read (:mod:`lad_fast.evaluate.external`). With segmentations, the lad-fast segmenter is loaded
    only for ``features="segmenter"``.
    Raises InputError / CheckpointError / ConfigError before any output is made.
    """
    from lad_fast.runs.checkpoints import versions

    clock = _Laps()
    inputs = _check_inputs(
        Path(real), Path(synthetic), features=features, fidelity=fidelity, segmentations=segmentations,
        real_segmentations=real_segmentations, segmentation_vocabulary=segmentation_vocabulary, strict=strict,
    )  # fmt: skip
    models = _load_models(inputs, features, weights, segmenter, device, batch_size)
    clock.lap("load")
    vols = _read_volumes(inputs, models.window, fidelity)
    clock.lap("read")
    f_real, f_syn, f_triv = _all_features(models.extractor, vols, batch_size)
    clock.lap("features")
    realism, references = _realism(f_real, f_syn, f_triv)
    clock.lap("distances")
    diversity = _diversity_block(vols)
    clock.lap("diversity")
    pred = _segment(vols, models, fidelity)
    fid_block = _fidelity_block(vols, pred, models.cond, fidelity, models.skipped)
    clock.lap("fidelity")
    intensity = _intensity_block(vols, pred, models.window, external=inputs.ext is not None)
    clock.lap("intensity")
    return {
        **_sources(inputs, models, vols, f_real.shape[1]),
        "realism": realism,
        "references": references,
        "diversity": diversity,
        "fidelity": fid_block,
        "intensity": intensity,
        "versions": versions(),
        "timings_s": clock.timings,
    }


def _jsonable(obj: Any) -> Any:
    """Settings objects (dataclasses, tuples) as plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
