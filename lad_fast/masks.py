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

Every source writes ``mask.npy`` (D, H, W) uint8 and ``structure.npy`` into the case folder atomically,
then rewrites ``index.json`` atomically, so the dataset is consistent at every instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.data.labels import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.errors import InputError

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


def validate_mask(mask: Any, shape: tuple[int, ...], source: str) -> np.ndarray:
    """Check a canonical mask against its image's ``shape`` (D, H, W); return it as uint8.

    InputError, naming ``source``, for: another shape than the image, non-finite or non-integer values,
    negative labels, ids outside the canonical organs (0..NUM_CLASSES-1).
    """
    arr = np.asarray(mask)
    if tuple(arr.shape) != tuple(shape):
        raise InputError(
            f"{source}: mask shape {tuple(arr.shape)} differs from its image's {tuple(shape)}; "
            "a mask must lie voxel for voxel on its image"
        )
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{source}: mask holds NaN or Inf; masks hold integer organ ids")
        if np.any(arr != np.round(arr)):
            raise InputError(f"{source}: float mask holds non-integer values; masks hold integer organ ids")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{source}: mask dtype {arr.dtype} is not numeric; masks hold integer organ ids")
    if arr.size and arr.min() < 0:
        raise InputError(f"{source}: mask holds negative labels (min {arr.min():g}); organ ids are 0 or more")
    if arr.size and arr.max() >= NUM_CLASSES:
        raise InputError(
            f"{source}: mask holds id {arr.max():g}, but canonical ids run 0..{NUM_CLASSES - 1}; "
            "map it to the canonical organs first (lad_fast.data.labels.to_canonical)"
        )
    return arr.astype(np.uint8)


def write_case_mask(folder: Path, mask: np.ndarray, structure: np.ndarray) -> None:
    """Write ``mask.npy`` (uint8) and ``structure.npy`` (int64) into a prepared case folder, atomically."""
    from lad_fast.atomic import atomic_path

    for name, array in (("mask.npy", np.asarray(mask, np.uint8)), ("structure.npy", np.asarray(structure))):
        with atomic_path(Path(folder) / name, suffix=".npy") as tmp:
            np.save(tmp, array.astype(np.int64) if name == "structure.npy" else array)


def _find_external(masks_dir: Path, case_id: str) -> Path | None:
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
    from lad_fast.atomic import write_json
    from lad_fast.conditions import structure_condition
    from lad_fast.config import get_preset
    from lad_fast.data.io import read_labels
    from lad_fast.data.labels import to_canonical
    from lad_fast.data.prepared import CASES, INDEX, PreparedDataset
    from lad_fast.progress import track

    data, masks_dir = Path(data), Path(masks_dir)
    dataset = PreparedDataset(data)
    if not masks_dir.is_dir():
        raise InputError(f"{masks_dir}: no such folder; pass the folder holding one mask per case id")
    cfg = cfg if cfg is not None else get_preset(dataset.preset)
    index = json.loads((data / INDEX).read_text(encoding="utf-8"))
    found = {e["id"]: _find_external(masks_dir, e["id"]) for e in index["cases"]}
    if not any(found.values()):
        shown = ", ".join(dataset.case_ids[:3])
        raise InputError(
            f"{masks_dir}: no mask for any case of {data} (expected <id>/ organ folders or <id>.nii.gz "
            f"for ids such as {shown})"
        )
    written = []
    for entry in track(index["cases"], "import masks"):
        path = found[entry["id"]]
        if path is None or (entry.get("has_mask") and not force):
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
        mask = validate_mask(mask, tuple(dataset.geometry.shape), str(path))
        write_case_mask(data / CASES / entry["id"], mask, structure_condition(mask, cfg.condition))
        entry["has_mask"] = True
        entry["mask_source"] = f"external:{path}"
        write_json(data / INDEX, index)
        written.append(entry["id"])
    return written


__all__ = [
    "CANONICAL_ORGANS",
    "import_masks",
    "mask_onto_case",
    "mask_source_kind",
    "validate_mask",
    "write_case_mask",
]
