"""Mask sources for a prepared dataset (issue 3 item 3): where each case's organ mask comes from.

Three sources, each recorded in the case's ``index.json`` entry as ``mask_source``:

* masks shipped with the dataset: ``lad-fast prepare`` maps them from their vocabulary to the canonical
  organs (``mask_source`` is the source file);
* masks an external segmenter wrote (:func:`import_masks`): a TotalSegmentator output per case, either
  its folder of ``<organ>.nii.gz`` files or one label NIfTI, read with the vocabulary it uses, mapped
  to canonical ids and resampled onto the prepared grid exactly as ``prepare`` resamples a mask
  (``mask_source: "external:<path>"``);
* the built-in segmenter (:func:`lad_fast.train.segmenter.predict_masks`,
  ``mask_source: "predicted:<run>"``).

The imported and predicted masks are written by :meth:`lad_fast.data.prepared.PreparedDataset.set_masks`,
which owns the case files and ``index.json``: it writes ``mask.npy`` (D, H, W) uint8 and ``structure.npy``
into each case folder atomically, then rewrites ``index.json`` atomically, so the dataset is consistent
at every instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.data.labels import CANONICAL_ORGANS, validate_mask
from lad_fast.errors import InputError
from lad_fast.utils.lock import locks_folder

# How far the resampled mask grid may sit from the prepared image grid (mm) before it counts as another
# grid: far below any voxel size, far above float rounding of the affines.
GRID_TOLERANCE_MM = 1e-2


def mask_source_kind(entry: dict[str, Any]) -> str | None:
    """ "dataset", "external", "predicted" or None (no mask) for one ``index.json`` case entry."""
    if not entry.get("has_mask"):
        return None
    source = str(entry.get("mask_source") or "")
    for kind in ("external", "predicted"):
        if source.startswith(f"{kind}:"):
            return kind
    return "dataset"


def find_external(masks_dir: Path, case_id: str) -> Path | None:
    """A case's external mask: ``<id>.nii.gz``, ``<id>.nii`` or an organ folder ``<id>/``; None if none."""
    folder = masks_dir / case_id
    for name in (f"{case_id}.nii.gz", f"{case_id}.nii"):
        if (masks_dir / name).is_file():
            return masks_dir / name
    if folder.is_dir():
        return folder
    return None


def _image_header_shape(entry: dict[str, Any]) -> tuple[int, ...] | None:
    """Shape of the case's source image (file voxel order) from its NIfTI header; None if unreadable."""
    import nibabel as nib

    path = Path(str(entry.get("image_source") or ""))
    if not path.is_file():
        return None
    try:
        shape = tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception:  # a moved or foreign source image: the grid check below still applies
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def mask_onto_case(
    canonical: np.ndarray, affine: np.ndarray, entry: dict[str, Any], geometry: Any, source: str
):
    """Canonical ids in file voxel order (I, J, K) with their (4, 4) affine -> the case's prepared grid.

    The same steps as ``prepare`` applies to a shipped mask: reorient, nearest resampling to the preset
    spacing, then the case's crop. Returns (D, H, W) uint8. InputError when the mask's grid is not the
    one the case's image was prepared from.
    """
    from lad_fast.data.geometry import canonical_dhw, crop_or_pad, resample, shifted_affine
    from lad_fast.data.volume import Volume

    ids, aff = canonical_dhw(Volume(np.asarray(canonical, dtype=np.uint8), affine, source))
    resampled, res_affine = resample(ids, aff, geometry.spacing, order=0)
    crop = entry["crop"]
    if list(resampled.shape) != list(crop["resampled_shape"]):
        raise InputError(
            f"{source}: mask resamples to shape {list(resampled.shape)}, its image to "
            f"{crop['resampled_shape']}; the mask's shape differs from its image (case {entry['id']})"
        )
    start = tuple(int(s) for s in crop["start"])
    final_affine = shifted_affine(res_affine, start)
    shift = float(np.abs(final_affine - np.asarray(entry["affine"], dtype=np.float64))[:3].max())
    if shift > GRID_TOLERANCE_MM:
        raise InputError(
            f"{source}: mask grid is {shift:.3g} mm away from its image's (case {entry['id']}); "
            "the mask is not aligned with the image it belongs to"
        )
    return crop_or_pad(resampled, start, tuple(geometry.shape), 0)


@locks_folder("data", "import-masks")  # one writer per prepared folder
def import_masks(
    data: Path,
    masks_dir: Path,
    vocabulary: str | dict[int, str] = "totalseg",
    cfg: Any | None = None,
    force: bool = False,
    strict: bool = False,
) -> list[str]:
    """Import masks an external segmenter wrote into the prepared dataset ``data``; returns the case ids.

    ``masks_dir`` holds one entry per case id: a TotalSegmentator folder ``<id>/`` of ``<organ>.nii.gz``
    masks, or a label map ``<id>.nii.gz`` in ``vocabulary`` ids (``totalseg``, ``abdomenct1k``, ``lad``,
    ``canonical`` or a ``{id: organ}`` map). The mask must lie on the grid of the case's source image.
    Cases that already have a mask are skipped unless ``force``; cases without an entry are skipped.
    ``cfg``: the LadConfig whose ``condition`` makes ``structure.npy`` (default: the dataset's preset).
    """
    from lad_fast.config import get_preset
    from lad_fast.data.io import read_labels
    from lad_fast.data.labels import to_canonical
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.utils.progress import track

    data, masks_dir = Path(data), Path(masks_dir)
    dataset = PreparedDataset(data)
    if not masks_dir.is_dir():
        raise InputError(f"{masks_dir}: no such folder; pass the folder holding one mask per case id")
    cfg = cfg if cfg is not None else get_preset(dataset.preset)
    found = {case_id: find_external(masks_dir, case_id) for case_id in dataset.case_ids}
    if not any(found.values()):
        shown = ", ".join(dataset.case_ids[:3])
        raise InputError(
            f"{masks_dir}: no mask for any case of {data} (expected <id>/ organ folders or <id>.nii.gz "
            f"for ids such as {shown})"
        )
    written = []
    for case_id in track(dataset.case_ids, "import masks"):
        path, entry = found[case_id], dataset.entry(case_id)
        if path is None or (entry["has_mask"] and not force):
            continue
        labels = read_labels(path)  # rejects float non-integer and negative labels, naming the file
        image_shape = _image_header_shape(entry)
        if image_shape is not None and tuple(labels.shape) != image_shape:
            raise InputError(
                f"{path}: mask shape {tuple(labels.shape)} differs from its image's {image_shape} "
                f"({entry['image_source']}); the mask must lie on the image's voxel grid"
            )
        canonical, _ = to_canonical(
            labels.array, vocabulary, affine=labels.affine, strict=strict, source=str(path)
        )
        mask = mask_onto_case(canonical, labels.affine, entry, dataset.geometry, str(path))
        # One case per call: a case is complete on disk (arrays and index) before the next is read.
        written += dataset.set_masks({case_id: (mask, f"external:{path}")}, cfg.condition)
    return written


__all__ = [
    "CANONICAL_ORGANS",
    "find_external",
    "import_masks",
    "mask_onto_case",
    "mask_source_kind",
    "validate_mask",
]
