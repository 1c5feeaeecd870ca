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
  (:mod:`lad_fast.evaluate.fidelity`); the segmentations come from lad-fast's segmenter, or from an
  external segmenter's files (``segmentations``, :mod:`lad_fast.evaluate.external`): then the real
  ceiling needs that segmenter's files for the real volumes too (``real_segmentations``), else it is
  reported as skipped, and no lad-fast segmenter is loaded unless the features need it;
* ``intensity``: per-organ HU median and IQR and HU histograms, real (labels) vs synthetic (conditioning
  masks);
plus sample counts, the extractor's name and weights hash, the segmenter's checkpoint hash and versions.
Sample sizes matter: FID is biased upwards at small N, so compare numbers measured at equal counts.

Why one file of ~450 lines: it is the one orchestration of every measurement and their references,
so the order in which volumes are read, segmented and scored is in one place; the measures themselves
live in metrics, features, fidelity and external.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.errors import CheckpointError, ConfigError, InputError

TRIVIAL_SEED = 0
# HU histograms span soft tissue (organs lie between fat, about -100, and contrast-filled vessels, about
# 300); voxels outside are counted in the end bins. Intersected with the window the volumes went through.
HISTOGRAM_HU = (-250.0, 350.0)


def _run_of(records: dict[str, dict[str, Any]]) -> Path | None:
    runs = {r.get("run") for r in records.values() if r.get("run")}
    return Path(sorted(runs)[0]) if len(runs) == 1 else None


def resolve_segmenter(segmenter: Path | None, records: dict[str, dict[str, Any]], synthetic: Path) -> Path:
    """The run whose segmenter labels the volumes: ``segmenter``, else the run that generated them."""
    from lad_fast.runs.checkpoints import latest_step_dir

    if segmenter is not None:
        return Path(segmenter)
    run = _run_of(records)
    if run is None:
        raise InputError(
            f"{synthetic}: its manifest names no single run that made it; pass --segmenter RUN "
            "(a run trained with `lad-fast train segmenter --run RUN`)"
        )
    if latest_step_dir(run / "segmenter") is None:
        raise CheckpointError(
            f"the run that generated {synthetic} ({run}) holds no segmenter; train one with "
            f"`lad-fast train segmenter --run {run}` or pass --segmenter RUN"
        )
    return run


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


@dataclass
class Segmenting:
    """The segmenter that labels volumes, and the settings the evaluation takes from the runs.

    window: the HU window the segmenter was trained on (both sides go through it); cond: the condition
    config of the run that generated the volumes (else the segmenter run's), for structure vectors.
    """

    run: Path
    net: torch.nn.Module
    device: torch.device
    window: tuple[float, float]
    cond: Any
    generator_run: Path | None


def load_segmenting(
    segmenter: Path | None, records: dict[str, dict[str, Any]], synthetic: Path, device: str
) -> Segmenting:
    from lad_fast.config import config_from_dict
    from lad_fast.runs import loading
    from lad_fast.utils.devices import resolve_device

    seg_run = resolve_segmenter(segmenter, records, synthetic)
    dev = resolve_device(device)
    net, meta = loading.load_segmenter(seg_run, dev)
    seg_cfg = config_from_dict(meta["config"])
    gen_run = _run_of(records)
    cond = seg_cfg.condition
    if gen_run is not None and (gen_run / "config.json").is_file():
        from lad_fast.runs.rundir import RunDir

        cond = RunDir.open(gen_run).config().condition  # the conditions the generator was given
    window = (float(seg_cfg.geometry.hu_window[0]), float(seg_cfg.geometry.hu_window[1]))
    return Segmenting(seg_run, net, dev, window, cond, gen_run)


def run_settings(records: dict[str, dict[str, Any]]) -> tuple[tuple[float, float], Any, Path | None]:
    """(HU window, condition config, generator run) without a segmenter: the run that generated the
    volumes when its config is at hand, else the defaults every preset shares (window -1000..400 HU,
    Lad's structure organs)."""
    from lad_fast.config import ConditionConfig, GeometryConfig

    gen_run = _run_of(records)
    if gen_run is not None and (gen_run / "config.json").is_file():
        from lad_fast.runs.rundir import RunDir

        cfg = RunDir.open(gen_run).config()
        window = (float(cfg.geometry.hu_window[0]), float(cfg.geometry.hu_window[1]))
        return window, cfg.condition, gen_run
    window = GeometryConfig().hu_window
    return (float(window[0]), float(window[1])), ConditionConfig(), gen_run


def _segmenter_record(seg: Segmenting | None) -> dict[str, Any] | None:
    from lad_fast.runs import loading

    if seg is None:
        return None
    return {"run": str(seg.run), "checkpoint_hash": loading.checkpoint_hash(seg.run / "segmenter")}


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
        "segmenter": _segmenter_record(seg),
        "segmentations": ext.describe() if ext is not None else None,
    }


def evaluate(
    real: Path,
    synthetic: Path,
    *,
    features: str = "segmenter",
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
    features: "segmenter" (encoder of the segmenter run), "medicalnet" or "radimagenet-2.5d" (both need
    ``weights``); see :mod:`lad_fast.evaluate.features`. segmenter:
    the run holding the segmenter (default: the run that generated ``synthetic``); fidelity: score masks
    (needs ``masks/``). segmentations: an external segmenter's masks of the synthetic volumes (one per
    volume id), used instead of the segmenter's predictions; real_segmentations: the same segmenter's
    masks of the real volumes (per real case id), for the real ceiling; segmentation_vocabulary, strict:
    how their labels are read (:mod:`lad_fast.evaluate.external`). With segmentations, the lad-fast
    segmenter is loaded only for ``features="segmenter"``.
    Raises InputError / CheckpointError / ConfigError before any output is made.
    """
    from lad_fast.evaluate.datasets import check_masks, read_real, read_synthetic, real_ids, synthetic_ids
    from lad_fast.evaluate.external import ExternalSegmentations
    from lad_fast.evaluate.features import EXTRACTORS, make_extractor
    from lad_fast.evaluate.fidelity import hu_histograms, hu_statistics, mask_fidelity, present_organs
    from lad_fast.evaluate.metrics import ms_ssim_settings
    from lad_fast.runs import loading
    from lad_fast.runs.checkpoints import versions

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)

    if features not in EXTRACTORS:
        raise InputError(f"unknown features {features!r}; choose one of: {', '.join(EXTRACTORS)}")
    real, synthetic = Path(real), Path(synthetic)
    # Cheap checks first: counts and files, before any model or volume is loaded.
    syn_ids, records = synthetic_ids(synthetic)
    check_counts(len(real_ids(real)), len(syn_ids), real, synthetic)
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
        ext_real.paths(real_ids(real), "real")
    seg: Segmenting | None = None
    if ext is None or features == "segmenter":
        seg = load_segmenting(segmenter, records, synthetic, device)
        dev, window, cond_cfg, gen_run = seg.device, seg.window, seg.cond, seg.generator_run
    else:
        from lad_fast.utils.devices import resolve_device

        dev = resolve_device(device)
        window, cond_cfg, gen_run = run_settings(records)
    extractor = make_extractor(
        features, weights=weights, segmenter=seg.net if seg is not None and features == "segmenter" else None,
        device=dev, batch_size=batch_size,
    )  # fmt: skip
    lap("load")

    syn, grid = read_synthetic(synthetic, syn_ids, window, with_masks=fidelity)
    rea = read_real(real, grid, window, ext_real)
    if ext is not None:
        from lad_fast.evaluate.external import read_synthetic_segmentations

        ext_syn = read_synthetic_segmentations(ext, syn.ids, syn.affines, grid[0])
    lap("read")

    f_real = _features(extractor, rea.images, rea.ids, "real", batch_size)
    f_syn = _features(extractor, syn.images, syn.ids, "synthetic", batch_size)
    trivial = trivial_volumes(rea.images, len(syn))
    f_triv = _features(extractor, trivial, [f"trivial_{i}" for i in range(len(syn))], "trivial", batch_size)
    lap("features")

    realism = _distances(f_real, f_syn)
    halves = (f_real[0::2], f_real[1::2])
    floor: dict[str, Any] = (
        _distances(*halves)
        if min(len(h) for h in halves) >= 2
        else {"skipped": f"needs at least 4 real volumes, got {len(rea)}"}
    )
    references = {
        "real_vs_real": {"definition": "real volumes at even positions vs odd positions", **floor},
        "trivial": {
            "definition": "voxel-wise real mean + Gaussian noise of the real voxel-wise std, clipped, "
            f"seed {TRIVIAL_SEED}",
            **_distances(f_real, f_triv),
        },
    }
    lap("distances")
    diversity = {
        "synthetic": _diversity(syn.images),
        "real": _diversity(rea.images),
        "definition": "mean pairwise MS-SSIM (higher: less diverse)",
        "ms_ssim": dict(zip(("kernel_size", "weights"), _jsonable(ms_ssim_settings(grid[0])), strict=True)),
    }
    lap("diversity")

    if ext is None:
        assert seg is not None
        pred_syn = loading.predict_volumes(seg.net, syn.images, dev)
        pred_real = loading.predict_volumes(seg.net, rea.images, dev) if len(rea) else None
    else:
        pred_syn, pred_real = ext_syn, rea.segmentations
    real_masks = rea.masks[rea.masked] if rea.masks is not None else None
    organs = present_organs(syn.masks, real_masks) if fidelity else present_organs(pred_syn, real_masks)
    fid_block: dict[str, Any] = {"organs": organs}
    if fidelity:
        fid_block.update(_conditioning_fidelity(pred_syn, syn, cond_cfg, organs))
    if real_masks is None:
        fid_block["real"] = {"skipped": "the real volumes have no labels"}
    elif pred_real is None:
        fid_block["real"] = {
            "skipped": "the synthetic segmentations come from an external segmenter; its real ceiling needs "
            "its segmentations of the real volumes (--real-segmentations DIR)"
        }
    else:
        fid_block["real"] = mask_fidelity(pred_real[rea.masked], real_masks, cond_cfg, organs)
    lap("fidelity")

    from lad_fast.data.geometry import unit_to_hu

    hu_real, hu_syn = unit_to_hu(rea.images, window), unit_to_hu(syn.images, window)
    span = (max(HISTOGRAM_HU[0], window[0]), min(HISTOGRAM_HU[1], window[1]))
    # Real HU inside the labels when every case has them, else inside the segmentations (external ones
    # when given), else inside the labels there are (unlabelled cases add no voxels).
    real_ref = rea.masks if rea.masks is not None and len(rea.masked) == len(rea) else pred_real
    if real_ref is None:
        real_ref = rea.masks if rea.masks is not None else np.zeros(rea.images.shape, dtype=np.uint8)
    predicted_by = "segmenter" if ext is None else "external segmentations"
    real_by = "labels" if real_ref is rea.masks else predicted_by if real_ref is pred_real else "none"
    syn_ref = syn.masks if syn.masks is not None else pred_syn
    intensity = {
        "real_masks": real_by,
        "synthetic_masks": "conditioning" if syn.masks is not None else predicted_by,
        "real": hu_statistics(hu_real, real_ref, organs),
        "synthetic": hu_statistics(hu_syn, syn_ref, organs),
        "histograms": {
            "real": hu_histograms(hu_real, real_ref, organs, span),
            "synthetic": hu_histograms(hu_syn, syn_ref, organs, span),
        },
    }
    lap("intensity")

    return {
        "real": {"source": str(real), "volumes": len(rea), "labelled": len(rea.masked)},
        "synthetic": {
            "source": str(synthetic),
            "volumes": len(syn),
            "run": str(gen_run) if gen_run else None,
        },
        "grid": {"shape": list(grid[0]), "spacing": list(grid[1]), "hu_window": list(window)},
        "features": {
            "extractor": extractor.name,
            "weights_hash": extractor.weights_hash,
            "dim": f_real.shape[1],
        },
        "segmenter": _segmenter_record(seg),
        "segmentations": {
            **ext.describe(),
            "real_source": str(ext_real.folder) if ext_real is not None else None,
        }
        if ext is not None
        else {"source": "segmenter", **(_segmenter_record(seg) or {})},
        "device": str(dev),
        "realism": realism,
        "references": references,
        "diversity": diversity,
        "fidelity": fid_block,
        "intensity": intensity,
        "versions": versions(),
        "timings_s": timings,
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
