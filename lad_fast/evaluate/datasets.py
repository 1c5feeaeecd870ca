"""Volumes to evaluate: a generated folder and the real volumes it is compared with.

Both sides come out on one grid, the synthetic volumes' (shape and spacing read from their NIfTI
headers), as float32 in [-1, 1] through the same HU window (:func:`lad_fast.data.geometry.hu_to_unit`, as
``lad-fast prepare`` maps them), so a feature network or segmenter sees both alike.

* synthetic: ``images/<id>.nii.gz`` (HU), ``masks/<id>.nii.gz`` (canonical ids) and ``manifest.jsonl``
  (``lad-fast generate``); without a manifest every image of ``images/`` is read.
* real: a prepared dataset (``index.json``), or a NIfTI folder: ``images/<id>.nii.gz`` with optional
  ``masks/<id>.nii.gz`` in canonical ids with a ``dataset.json`` listing them (the layout ``generate``
  writes), or NIfTI images directly in the folder. Other layouts and label vocabularies: run
  ``lad-fast prepare`` first and pass its output. Real volumes on another grid are resampled and cropped
  like ``prepare`` does (:func:`lad_fast.data.geometry.prepare_case`); an external segmenter's masks of
  them (:mod:`lad_fast.evaluate.external`) follow the same resampling and crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lad_fast.errors import InputError

if TYPE_CHECKING:
    from lad_fast.evaluate.external import ExternalSegmentations

Grid = tuple[tuple[int, int, int], tuple[float, float, float]]  # (shape (D, H, W), spacing mm)


@dataclass
class VolumeSet:
    """Volumes of one side on the evaluation grid.

    images (N, D, H, W) float32 in [-1, 1]; masks (N, D, H, W) uint8 canonical ids or None (a real set
    may hold masks for some cases only: ``masked`` lists their positions); groups: the source case of each
    volume (synthetic) or its id (real); affines: each volume's canonical (D, H, W) affine (synthetic);
    segmentations (N, D, H, W) uint8: an external segmenter's masks on this grid, when read.
    """

    source: str
    ids: list[str]
    images: np.ndarray
    masks: np.ndarray | None
    masked: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    affines: list[np.ndarray] = field(default_factory=list)
    segmentations: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _nifti_ids(folder: Path) -> list[str]:
    from lad_fast.data.io import is_nifti, nifti_stem

    return sorted(nifti_stem(p) for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _nifti(folder: Path, vid: str) -> Path:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{vid}{suffix}").is_file():
            return folder / f"{vid}{suffix}"
    return folder / f"{vid}.nii.gz"


# -------------------------------------------------------------------------------------------- synthetic


def synthetic_ids(folder: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Ids of a generated folder (manifest order; every image without a manifest) and manifest lines."""
    from lad_fast.generate.writer import IMAGES, read_manifest

    folder = Path(folder)
    if not (folder / IMAGES).is_dir():
        raise InputError(
            f"{folder}: no {IMAGES}/ folder; pass the output folder of `lad-fast generate` as --synthetic"
        )
    records = {r["id"]: r for _, r in sorted(read_manifest(folder).items()) if isinstance(r.get("id"), str)}
    on_disk = set(_nifti_ids(folder / IMAGES))
    ids = [i for i in records if i in on_disk] if records else sorted(on_disk)
    return ids, records


def check_masks(folder: Path, ids: list[str]) -> None:
    """InputError naming the first volume of ``ids`` without ``masks/<id>.nii.gz``."""
    from lad_fast.generate.writer import MASKS

    missing = [i for i in ids if not _nifti(Path(folder) / MASKS, i).is_file()]
    if missing:
        raise InputError(
            f"{folder}: {len(missing)} of {len(ids)} volumes have no {MASKS}/{missing[0]}.nii.gz; mask "
            "fidelity compares each volume with the mask that conditioned it: pass the folder "
            "`lad-fast generate` wrote, or --no-fidelity to skip mask fidelity"
        )


def _read_canonical(path: Path, labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file as a canonical (D, H, W) array and its affine, without resampling."""
    from lad_fast.data.geometry import canonical_dhw
    from lad_fast.data.io import read_image, read_labels

    return canonical_dhw(read_labels(path) if labels else read_image(path))


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def read_synthetic(
    folder: Path, ids: list[str], window: tuple[float, float], with_masks: bool
) -> tuple[VolumeSet, Grid]:
    """The generated volumes ``ids`` of ``folder`` and their common grid; InputError when they differ."""
    from lad_fast.data.geometry import hu_to_unit
    from lad_fast.generate.writer import IMAGES, MASKS, read_manifest
    from lad_fast.utils.progress import track

    folder = Path(folder)
    sources = {r.get("id"): str(r.get("source_case", r.get("id"))) for r in read_manifest(folder).values()}
    images, masks, affines, grid = [], [], [], None
    for vid in track(ids, "read synthetic"):
        hu, affine = _read_canonical(_nifti(folder / IMAGES, vid), labels=False)
        this = (tuple(int(n) for n in hu.shape), _spacing(affine))
        if grid is None:
            grid = this
        elif this[0] != grid[0] or not np.allclose(this[1], grid[1], atol=1e-3):
            raise InputError(
                f"{folder}: {vid} has shape {this[0]} at {this[1]} mm but {ids[0]} has {grid[0]} at "
                f"{grid[1]} mm; evaluate volumes generated on one grid (one run, one preset)"
            )
        images.append(hu_to_unit(hu, window))
        affines.append(affine)
        if with_masks:
            mask, _ = _read_canonical(_nifti(folder / MASKS, vid), labels=True)
            if mask.shape != hu.shape:
                raise InputError(f"{folder}: {MASKS}/{vid} has shape {mask.shape}, its image {hu.shape}")
            masks.append(mask.astype(np.uint8))
    assert grid is not None
    out = VolumeSet(
        source=str(folder),
        ids=list(ids),
        images=np.stack(images),
        masks=np.stack(masks) if with_masks else None,
        masked=list(range(len(ids))) if with_masks else [],
        groups=[sources.get(i, i) for i in ids],
        affines=affines,
    )
    return out, grid


# ------------------------------------------------------------------------------------------------- real


def real_ids(path: Path) -> list[str]:
    """Ids of the real volumes at ``path`` (a prepared dataset or a NIfTI folder), without reading them."""
    from lad_fast.data.prepared import INDEX, PreparedDataset

    path = Path(path)
    if (path / INDEX).is_file():
        return PreparedDataset(path).case_ids
    if not path.is_dir():
        raise InputError(
            f"{path}: no such folder; pass a prepared dataset or a folder of NIfTI volumes as --real"
        )
    folder = path / "images" if (path / "images").is_dir() else path
    return _nifti_ids(folder)


def _check_canonical_labels(path: Path) -> None:
    """Masks of a NIfTI folder are read as canonical ids only when its ``dataset.json`` says so (as
    ``lad-fast generate`` writes it): ids of another vocabulary would silently name other organs."""
    import json

    from lad_fast.data.labels import CANONICAL_ORGANS
    from lad_fast.generate.writer import DATASET_JSON

    try:
        labels = json.loads((path / DATASET_JSON).read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        labels = None
    if labels != {name: i for i, name in enumerate(CANONICAL_ORGANS)}:
        raise InputError(
            f"{path}: masks/ without a {DATASET_JSON} listing lad-fast's canonical labels, so their ids "
            f"cannot be trusted to name organs; prepare the folder (`lad-fast prepare {path} OUT`) and "
            "pass OUT"
        )


def _onto_grid(
    hu: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray | None,
    grid: Grid,
    window: tuple[float, float],
    name: str,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """A canonical (D, H, W) HU volume (and mask) resampled and cropped onto ``grid`` like ``prepare``,
    and the placement (an ``index.json``-like entry: crop and final affine) that
    :func:`lad_fast.data.masks.mask_onto_case` needs to move another mask of the source grid the same way."""
    from lad_fast.config import GeometryConfig
    from lad_fast.data.geometry import dhw_to_nifti, prepare_case
    from lad_fast.data.volume import Volume

    geom = GeometryConfig(shape=grid[0], spacing=grid[1], hu_window=window)
    image = Volume(*dhw_to_nifti(hu, affine), name)
    labels = None if mask is None else Volume(*dhw_to_nifti(mask.astype(np.uint8), affine), name)
    try:
        case = prepare_case(image, labels, geom)
    except InputError as err:
        raise InputError(
            f"real volume {name} cannot be resampled onto the synthetic grid {grid[0]} at {grid[1]} mm: {err}"
        ) from None
    placement = {
        "id": name,
        "crop": {"resampled_shape": list(case.resampled_shape), "start": list(case.crop_start)},
        "affine": case.affine,
    }
    return case.image, case.mask, placement


def read_real(
    path: Path, grid: Grid, window: tuple[float, float], segmentations: ExternalSegmentations | None = None
) -> VolumeSet:
    """Real volumes at ``path`` on the synthetic ``grid``, through ``window``; masks where there are any.

    segmentations: an external segmenter's masks of the real volumes, on each real volume's source grid
    (:mod:`lad_fast.evaluate.external`); they follow the image onto ``grid`` into ``.segmentations``.
    """
    from lad_fast.config import GeometryConfig
    from lad_fast.data.geometry import dhw_to_nifti, hu_to_unit, unit_to_hu
    from lad_fast.data.masks import mask_onto_case
    from lad_fast.data.prepared import INDEX, PreparedDataset
    from lad_fast.utils.progress import track

    path = Path(path)
    images, masks, segs = [], [], []
    eval_geom = GeometryConfig(shape=grid[0], spacing=grid[1], hu_window=window)
    seg_paths = segmentations.paths(real_ids(path), "real") if segmentations is not None else []
    if (path / INDEX).is_file():
        ds = PreparedDataset(path)
        same = tuple(ds.geometry.shape) == grid[0] and np.allclose(ds.geometry.spacing, grid[1], atol=1e-3)
        ids = ds.case_ids
        for i in track(range(len(ds)), "read real"):
            item = ds[i]
            hu = unit_to_hu(np.asarray(item["image"], dtype=np.float32), ds.geometry.hu_window)
            mask = None if item["mask"] is None else np.asarray(item["mask"], dtype=np.uint8)
            if same:
                images.append(hu_to_unit(hu, window))
                masks.append(mask)
            else:
                img, m, placed = _onto_grid(hu, item["affine"], mask, grid, window, f"{path}:{item['id']}")
                images.append(img)
                masks.append(m)
            if segmentations is not None:  # source image grid -> prepared grid (as import-masks does)
                canonical, seg_affine = segmentations.read(seg_paths[i])
                seg = mask_onto_case(canonical, seg_affine, ds.entry(ids[i]), ds.geometry, str(seg_paths[i]))
                if not same:  # -> the evaluation grid, as the image went
                    seg = mask_onto_case(
                        *dhw_to_nifti(seg, item["affine"]), placed, eval_geom, str(seg_paths[i])
                    )
                segs.append(seg)
    else:
        ids = real_ids(path)
        folder = path / "images" if (path / "images").is_dir() else path
        mask_dir = path / "masks" if folder != path and (path / "masks").is_dir() else None
        if mask_dir is not None:
            _check_canonical_labels(path)
        for n, vid in enumerate(track(ids, "read real")):
            hu, affine = _read_canonical(_nifti(folder, vid), labels=False)
            mask = None
            if mask_dir is not None and _nifti(mask_dir, vid).is_file():
                mask, m_affine = _read_canonical(_nifti(mask_dir, vid), labels=True)
                if mask.shape != hu.shape or not np.allclose(m_affine, affine, atol=1e-3):
                    raise InputError(f"{mask_dir / vid}: mask is not on the grid of its image {folder / vid}")
            img, m, placed = _onto_grid(hu, affine, mask, grid, window, str(folder / vid))
            images.append(img)
            masks.append(m)
            if segmentations is not None:
                from lad_fast.evaluate.external import on_grid

                canonical, seg_affine = segmentations.read(seg_paths[n])
                source = str(seg_paths[n])
                seg = on_grid(canonical, seg_affine, hu.shape, affine, source, str(folder / vid))
                segs.append(mask_onto_case(*dhw_to_nifti(seg, affine), placed, eval_geom, source))
    masked = [i for i, m in enumerate(masks) if m is not None]
    stacked = None
    if masked:
        stacked = np.zeros((len(ids), *grid[0]), dtype=np.uint8)
        for i in masked:
            stacked[i] = masks[i]
    out = VolumeSet(str(path), list(ids), np.stack(images).astype(np.float32), stacked, masked, list(ids))
    out.segmentations = np.stack(segs).astype(np.uint8) if segs else None
    return out
