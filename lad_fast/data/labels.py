"""Label vocabularies and the one canonical organ list every prepared dataset uses.

Inputs arrive with TotalSegmentator v2 ids, AbdomenCT-1K ids, the Lad/UniSeg pancreas ids or a user JSON
map; :func:`to_canonical` maps all of them onto :data:`CANONICAL_ORGANS` at prepare time. The canonical
list itself is defined in :mod:`lad_fast.organs`, below the modules that need the ids without the data
package (``lad_fast.conditioning.conditions``, which ``lad_fast.data.prepared`` uses).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lad_fast.errors import ConfigError, InputError

# The canonical ids are re-exported here, where most callers import them.
from lad_fast.organs import CANONICAL_ID, CANONICAL_ORGANS, NUM_CLASSES  # noqa: F401

# A vocabulary may map an id to "kidney" (both sides in one label, as AbdomenCT-1K does);
# to_canonical splits it into kidney_right / kidney_left by body side.
KIDNEY_BOTH_SIDES = "kidney"

# TotalSegmentator v2 "total" task ids of the organs lad-fast keeps (checked against
# wasserth/TotalSegmentator totalsegmentator/map_to_binary.py, class_map["total"]).
TOTALSEG_V2: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    52: "aorta",
    63: "inferior_vena_cava",
    # 25 sacrum, 26 vertebrae_S1, 27..50 vertebrae L5 .. C1
    **{i: "vertebrae" for i in range(25, 51)},
}
# The "total" task has ids 1..117; ids lad-fast does not keep are known (mapped to background quietly),
# anything above is outside the vocabulary (warned about).
TOTALSEG_V2_MAX_ID = 117

# TotalSegmentator file names (one `<name>.nii.gz` per organ in its folder output) of the kept organs.
_VERTEBRA_LEVELS = ["S1", *[f"L{i}" for i in range(5, 0, -1)], *[f"T{i}" for i in range(12, 0, -1)]]
_VERTEBRA_LEVELS += [f"C{i}" for i in range(7, 0, -1)]
TOTALSEG_V2_NAMES: dict[str, int] = {
    **{name: i for i, name in TOTALSEG_V2.items() if name != "vertebrae"},
    "sacrum": 25,
    **{f"vertebrae_{level}": 26 + n for n, level in enumerate(_VERTEBRA_LEVELS)},
}

# AbdomenCT-1K: one "kidney" label for both sides; split by body side at prepare time.
ABDOMENCT1K: dict[int, str] = {1: "liver", 2: KIDNEY_BOTH_SIDES, 3: "spleen", 4: "pancreas"}

# Lad / UniSeg pancreas task (the official Lad code's predicted masks).
LAD_PANCREAS: dict[int, str] = {1: "pancreas", 2: "pancreatic_lesion"}

VOCABULARIES: dict[str, dict[int, str]] = {
    "totalseg": {**{i: "background" for i in range(1, TOTALSEG_V2_MAX_ID + 1)}, **TOTALSEG_V2},
    "abdomenct1k": ABDOMENCT1K,
    "lad": LAD_PANCREAS,
    "canonical": dict(enumerate(CANONICAL_ORGANS)),
}

# Names a user map may use: the canonical organs plus "kidney" (split by side).
MAP_TARGETS: tuple[str, ...] = (*CANONICAL_ORGANS, KIDNEY_BOTH_SIDES)


class UnknownLabelWarning(UserWarning):
    """A label map holds ids outside its vocabulary; they were mapped to background."""


def parse_user_map(obj: Any, source: str) -> dict[int, str]:
    """Validate a decoded JSON map ``{"<id>": "<canonical organ>"}`` into ``{id: organ}``."""
    if not isinstance(obj, dict) or not obj:
        raise InputError(f'{source}: a label map must be a non-empty JSON object {{"<id>": "<organ>"}}')
    out: dict[int, str] = {}
    for key, name in obj.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{source}: label id {key!r} is not an integer") from None
        if i < 0:
            raise InputError(f"{source}: label id {i} is negative; ids are 0 or more")
        if name not in MAP_TARGETS:
            raise InputError(
                f"{source}: unknown organ {name!r} for id {i}; valid names: {', '.join(MAP_TARGETS)}"
            )
        out[i] = name
    return out


def load_user_map(path: Path | str) -> dict[int, str]:
    """Read a JSON file ``{"<id>": "<canonical organ>"}`` (ids as strings, as JSON requires)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: label map file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON label map ({exc})") from None
    return parse_user_map(obj, str(path))


def vocabulary_table(vocabulary: str | dict[int, str]) -> dict[int, str]:
    """The ``{id: organ}`` table of a named vocabulary, or a user map passed through after validation."""
    if isinstance(vocabulary, str):
        if vocabulary not in VOCABULARIES:
            raise ConfigError(
                f"unknown label vocabulary {vocabulary!r}; choose one of {', '.join(VOCABULARIES)} "
                "or pass a JSON map"
            )
        return VOCABULARIES[vocabulary]
    return parse_user_map({str(k): v for k, v in vocabulary.items()}, "label map")


def split_kidneys(
    kidney: np.ndarray, affine: np.ndarray, midline_x: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a both-sides kidney mask into (right, left) masks by body side.

    Rule: each 26-connected component goes to the side of its centroid's world x (RAS: +x is the
    patient's right) relative to ``midline_x``; a component is never cut in two. ``midline_x`` defaults
    to the world x of the centroid of all kidney voxels, which lies between two kidneys of similar size.
    ``kidney``: (I, J, K) bool in file voxel order; ``affine``: (4, 4) voxel -> RAS mm.
    """
    right = np.zeros(kidney.shape, dtype=bool)
    left = np.zeros(kidney.shape, dtype=bool)
    if not kidney.any():
        return right, left
    # Work inside the bounding box: labelling the whole volume costs seconds on a full-size CT.
    box = ndimage.find_objects(kidney.astype(np.uint8))[0]
    offset = np.array([s.start for s in box], dtype=np.float64)
    comps, n = ndimage.label(kidney[box], structure=np.ones((3, 3, 3), dtype=bool))
    index = np.arange(1, n + 1)
    centroids = np.array(ndimage.center_of_mass(np.ones_like(comps), comps, index)).reshape(n, 3) + offset
    world_x = centroids @ affine[0, :3] + affine[0, 3]
    if midline_x is None:
        sizes = ndimage.sum_labels(np.ones_like(comps), comps, index)
        midline_x = float((world_x * sizes).sum() / sizes.sum())
    is_right = np.concatenate([[False], world_x > midline_x])
    right[box] = is_right[comps] & (comps > 0)
    left[box] = ~is_right[comps] & (comps > 0)
    return right, left


def _world_x_of(mask: np.ndarray, affine: np.ndarray) -> float | None:
    if not mask.any():
        return None
    centroid = np.array(ndimage.center_of_mass(mask))
    return float(centroid @ affine[0, :3] + affine[0, 3])


_CHUNK = 1 << 22  # voxels per step: indexing converts ids to intp, 8 bytes each; keep that copy small


def _present_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted ids that occur in ``labels`` (bincount is much faster than np.unique on big volumes)."""
    top = int(labels.max()) if labels.size else 0
    if top >= 1 << 16:
        return np.unique(labels)
    counts = np.zeros(top + 1, dtype=np.int64)
    flat = labels.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        counts += np.bincount(flat[start : start + _CHUNK], minlength=top + 1)
    return np.flatnonzero(counts)


def _apply_lut(lut: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.empty(labels.size, dtype=lut.dtype)
    flat = labels.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        out[start : start + _CHUNK] = lut[flat[start : start + _CHUNK]]
    return out.reshape(labels.shape)


def to_canonical(
    labels: np.ndarray,
    vocabulary: str | dict[int, str],
    affine: np.ndarray | None = None,
    strict: bool = False,
    source: str = "",
) -> tuple[np.ndarray, list[int]]:
    """Map a label map in ``vocabulary`` ids to canonical ids (positions in :data:`CANONICAL_ORGANS`).

    ``labels``: (I, J, K) integer ids (or float holding integers); ``affine``: (4, 4) voxel -> RAS mm,
    needed only to split a both-sides "kidney" label. Returns a uint8 array of the same shape and the
    sorted ids present in ``labels`` but absent from the vocabulary; those become background with an
    :class:`UnknownLabelWarning`, or an :class:`InputError` when ``strict``.

    Kidney split (AbdomenCT-1K): every connected component of the kidney label goes right or left by its
    centroid's world x against a midline. The midline is halfway between the liver and spleen centroids
    when the map holds both (they sit on opposite sides, far from the kidneys); otherwise the centroid
    of the kidney voxels. The centroid of *all* labelled voxels is not used: the liver outweighs
    everything else and drags it to the right, past the right kidney.
    """
    name = source or "label map"
    table = vocabulary_table(vocabulary)
    vocab_name = vocabulary if isinstance(vocabulary, str) else "user map"
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isfinite(labels)):
            raise InputError(f"{name}: label map has dtype {labels.dtype} or non-finite values; need int ids")
        if np.any(labels != np.round(labels)):
            raise InputError(f"{name}: label map holds non-integer values; need integer organ ids")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise InputError(f"{name}: label map holds negative ids (min {int(labels.min())}); ids are 0 or more")

    present = _present_ids(labels)
    unknown = [int(i) for i in present if i != 0 and int(i) not in table]
    if unknown:
        msg = f"{name}: label ids {unknown} are outside the {vocab_name} vocabulary"
        if strict:
            raise InputError(f"{msg} (without --strict they would be mapped to background)")
        warnings.warn(f"{msg}; mapped to background", UnknownLabelWarning, stacklevel=2)

    # Lookup table id -> canonical id; 255 marks "kidney, side to be decided".
    top = int(present[-1]) if present.size else 0
    lut = np.zeros(top + 1, dtype=np.uint8)
    for i, organ in table.items():
        if i <= top:
            lut[i] = 255 if organ == KIDNEY_BOTH_SIDES else CANONICAL_ID[organ]
    if top < 1 << 16:
        out = _apply_lut(lut, labels)
    else:  # sparse huge ids: map only the ids present instead of indexing a giant table
        out = np.zeros(labels.shape, dtype=np.uint8)
        for i in present:
            organ = table.get(int(i))
            if organ is not None:
                out[labels == i] = 255 if organ == KIDNEY_BOTH_SIDES else CANONICAL_ID[organ]

    kidney = out == 255
    if kidney.any():
        if affine is None:
            raise ValueError(f"{name}: splitting the both-sides kidney label needs the volume's affine")
        affine = np.asarray(affine, dtype=np.float64)
        liver_x = _world_x_of(out == CANONICAL_ID["liver"], affine)
        spleen_x = _world_x_of(out == CANONICAL_ID["spleen"], affine)
        midline = None if liver_x is None or spleen_x is None else 0.5 * (liver_x + spleen_x)
        right, left = split_kidneys(kidney, affine, midline)
        out[right] = CANONICAL_ID["kidney_right"]
        out[left] = CANONICAL_ID["kidney_left"]
    return out, unknown


@dataclass(frozen=True)
class LabelWording:
    """How :func:`integer_labels` words its errors (after ``"<source>: "``); ``{dtype}`` and ``{min}``
    are filled in."""

    nan: str
    fraction: str
    dtype: str
    negative: str


MASK_WORDING = LabelWording(
    nan="mask holds NaN or Inf; masks hold integer organ ids",
    fraction="float mask holds non-integer values; masks hold integer organ ids",
    dtype="mask dtype {dtype} is not numeric; masks hold integer organ ids",
    negative="mask holds negative labels (min {min:g}); organ ids are 0 or more",
)
FILE_WORDING = LabelWording(
    nan="label map holds NaN or Inf; labels must be integer organ ids",
    fraction="label map holds non-integer values; labels must be integer organ ids",
    dtype="label voxel type {dtype} is not numeric; labels must be integer ids",
    negative="label map holds negative values (min {min:g}); labels are ids 0 or more",
)


def integer_labels(data: Any, source: str | Path, wording: LabelWording = FILE_WORDING) -> np.ndarray:
    """``data`` as the smallest unsigned int type holding its labels (bool -> uint8); floats must hold
    whole numbers. InputError ``"<source>: <wording>"`` for NaN/Inf, fractions, a non-numeric dtype or
    negative values. The one integer-label check of label files (:mod:`lad_fast.data.io`) and of masks
    (:func:`validate_mask`)."""
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{source}: {wording.nan}")
        if np.any(arr != np.round(arr)):
            raise InputError(f"{source}: {wording.fraction}")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{source}: {wording.dtype.format(dtype=arr.dtype)}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InputError(f"{source}: {wording.negative.format(min=lo)}")
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
    return arr.astype(dtype, copy=False)


def validate_mask(mask: Any, shape: tuple[int, ...], source: str) -> np.ndarray:
    """Check a canonical mask against its image's ``shape`` (D, H, W); return it as uint8.

    InputError, naming ``source``, for: another shape than the image, non-finite or non-integer values,
    negative labels (:func:`integer_labels`), ids outside the canonical organs (0..NUM_CLASSES-1).
    """
    arr = np.asarray(mask)
    if tuple(arr.shape) != tuple(shape):
        raise InputError(
            f"{source}: mask shape {tuple(arr.shape)} differs from its image's {tuple(shape)}; "
            "a mask must lie voxel for voxel on its image"
        )
    arr = integer_labels(arr, source, MASK_WORDING)
    if arr.size and arr.max() >= NUM_CLASSES:
        raise InputError(
            f"{source}: mask holds id {arr.max():g}, but canonical ids run 0..{NUM_CLASSES - 1}; "
            "map it to the canonical organs first (lad_fast.data.labels.to_canonical)"
        )
    return arr.astype(np.uint8)
