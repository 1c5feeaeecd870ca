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

A case prepared without a mask has a centred slice window (``"window": "centre"``), which may miss the
organs the window is meant to hold (on a scan reaching the pelvis it does). When its mask arrives, the
window is chosen again from the mask: the source image is read again (verified against the case's
``content_hash``), image and mask are cropped together exactly as ``prepare`` crops them
(:func:`recrop_case`), and :meth:`~lad_fast.data.prepared.PreparedDataset.replace_case` rewrites the case
whole. A case whose window is already set (by the mask it was prepared with, or one that arrived
earlier) keeps it, and its new mask is cropped to it
(:meth:`~lad_fast.data.prepared.PreparedDataset.set_masks`).
Either way, a mask with none of the window organs (Lad: pancreas, lesion) inside the final window is
refused (:func:`check_window_organs`), or only warned about with ``allow_empty``: an empty mask written
with success is the failure this prevents.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lad_fast.data.labels import CANONICAL_ORGANS, validate_mask
from lad_fast.errors import InputError
from lad_fast.utils.lock import locks_folder

if TYPE_CHECKING:
    from lad_fast.config import ConditionConfig, GeometryConfig
    from lad_fast.data.geometry import ColumnCase
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.data.volume import Volume

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


class EmptyMaskWarning(UserWarning):
    """A mask holding none of the window organs was written anyway (``allow_empty``)."""


def window_of(entry: dict[str, Any]) -> str:
    """How the case's slice window was chosen: "centre" (no mask yet: chosen again when one arrives),
    "mask" or "later mask". Entries written before the field existed: from ``mask_source``."""
    if entry.get("window"):
        return str(entry["window"])
    return "mask" if mask_source_kind(entry) == "dataset" else "centre"


def check_window_organs(
    mask: np.ndarray, geometry: GeometryConfig, what: str, allow_empty: bool = False
) -> None:
    """Refuse (InputError) a final (D, H, W) canonical ``mask`` with none of ``geometry.window_organs``,
    or warn (:class:`EmptyMaskWarning`) with ``allow_empty``. ``what`` names the mask and its case."""
    from lad_fast.data.geometry import window_organ_ids

    organs = ", ".join(geometry.window_organs)
    if not np.any(mask):
        problem = "is empty on the prepared grid (no organ at all)"
    elif not np.isin(mask, window_organ_ids(geometry)).any():
        problem = f"holds none of the organs its slice window is chosen by ({organs}) inside that window"
    else:
        return
    hint = "check that it is this case's mask and that its ids are read with the right --vocabulary"
    if allow_empty:
        warnings.warn(f"{what}: mask {problem}; written anyway (--allow-empty)", EmptyMaskWarning, 2)
        return
    raise InputError(f"{what}: mask {problem}; {hint}, or pass --allow-empty to import it anyway")


def source_column(
    dataset: PreparedDataset,
    case_id: str,
    labels: Volume | None = None,
    canonical: np.ndarray | None = None,
) -> ColumnCase:
    """The case's source image, read again and verified, on the preset grid with every slice kept: a
    :class:`lad_fast.data.geometry.ColumnCase` (``hu`` (D', H, W)), whose mask is ``labels`` (a Volume on
    the source image's grid, with ``canonical`` its ids mapped to canonical organs) or None.

    A segmenter that predicts a case's mask over its whole height gives the column its ``mask`` and hands
    it to :func:`recrop_case`. InputError when the source image is gone or changed since ``prepare``.
    """
    from lad_fast.data.digest import source_hash
    from lad_fast.data.geometry import column_case
    from lad_fast.data.io import check_pair, read_image

    entry = dataset.entry(case_id)
    path = Path(str(entry.get("image_source") or ""))
    why = (
        f"case {case_id} was prepared without a mask, so its slice window is chosen again from the mask "
        f"that arrives, which needs its source image {path}"
    )
    redo = "or prepare the case together with its mask (`lad-fast prepare`)"
    if not path.exists():
        raise InputError(f"{why}; it is not there any more: put it back there, {redo}")
    # "null": the vocabulary prepare hashes with a case without a mask
    if source_hash([path, None], "null") != entry.get("content_hash"):
        raise InputError(f"{why}; it changed since prepare (its content hash differs): restore it, {redo}")
    image = read_image(path)
    if labels is not None:
        check_pair(image, labels)
    return column_case(image, labels, dataset.geometry, canonical)


def recrop_case(
    dataset: PreparedDataset,
    case_id: str,
    column: ColumnCase,
    source: str,
    condition: ConditionConfig,
    allow_empty: bool = False,
) -> None:
    """Choose the slice window of ``column`` (a :func:`source_column` with its ``mask`` set) from its mask,
    crop image and mask together as ``prepare`` does, check the window organs
    (:func:`check_window_organs`) and rewrite the case whole
    (:meth:`lad_fast.data.prepared.PreparedDataset.replace_case`, ``"window": "later mask"``)."""
    from lad_fast.data.geometry import window_case
    from lad_fast.data.prepared import WINDOW_LATER_MASK

    case = window_case(column, dataset.geometry)
    check_window_organs(case.mask, dataset.geometry, f"case {case_id} ({source})", allow_empty)
    fields = {"crop": case.crop_box(), "affine": np.asarray(case.affine).tolist()}
    fields["window"] = WINDOW_LATER_MASK
    dataset.replace_case(case_id, case.image, case.mask, source, condition, fields)


@locks_folder("data", "import-masks")  # one writer per prepared folder
def import_masks(
    data: Path,
    masks_dir: Path,
    vocabulary: str | dict[int, str] = "totalseg",
    cfg: Any | None = None,
    force: bool = False,
    strict: bool = False,
    allow_empty: bool = False,
) -> list[str]:
    """Import masks an external segmenter wrote into the prepared dataset ``data``; returns the case ids.

    ``masks_dir`` holds one entry per case id: a TotalSegmentator folder ``<id>/`` of ``<organ>.nii.gz``
    masks, or a label map ``<id>.nii.gz`` in ``vocabulary`` ids (``totalseg``, ``abdomenct1k``, ``lad``,
    ``canonical`` or a ``{id: organ}`` map). The mask must lie on the grid of the case's source image.
    A case prepared without a mask gets its slice window chosen again from the mask (the module says how),
    so its arrays equal those of preparing image and mask together. A mask with none of the window organs
    inside the final window is refused, or written with a warning when ``allow_empty``.
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
        source = f"external:{path}"
        # One case per call: a case is complete on disk (arrays and index) before the next is read.
        if window_of(entry) == "centre":
            column = source_column(dataset, case_id, labels, canonical)
            recrop_case(dataset, case_id, column, source, cfg.condition, allow_empty)
            written.append(case_id)
            continue
        mask = mask_onto_case(canonical, labels.affine, entry, dataset.geometry, str(path))
        check_window_organs(mask, dataset.geometry, f"case {case_id} ({source})", allow_empty)
        written += dataset.set_masks({case_id: (mask, source)}, cfg.condition)
    return written


__all__ = [
    "CANONICAL_ORGANS",
    "EmptyMaskWarning",
    "check_window_organs",
    "find_external",
    "import_masks",
    "mask_onto_case",
    "mask_source_kind",
    "recrop_case",
    "source_column",
    "validate_mask",
    "window_of",
]
