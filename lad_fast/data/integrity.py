"""Integrity of a prepared dataset: ``index.json`` parsed defensively, each case's arrays checked against it.

Every training and generation job reads a prepared dataset back, so what it reads is checked first:

* :func:`read_index` and :func:`check_index`: ``index.json`` as prepare writes it, or one line naming the
  file and what to do for bad bytes, bad JSON, a missing or mistyped key (schema version, preset,
  geometry, organ list, a case entry);
* :func:`entry_problem`: what is wrong with one case entry (None when it is well formed); ``prepare``
  re-prepares a case whose entry is damaged instead of copying the entry forward;
* :func:`case_problem`: what is wrong with one case's arrays: a shape other than the geometry's, a dtype
  other than prepare's, a NaN or Inf voxel, mask ids outside the canonical organs, or values other than
  those the entry's ``image_hash`` and ``mask_hash`` record (:mod:`lad_fast.data.digest`). A rerun of
  ``prepare`` re-prepares exactly the cases it finds a problem in, so :func:`reprepare_command` is the fix
  every refusal names.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.config import GeometryConfig, config_from_dict
from lad_fast.errors import ConfigError, InputError
from lad_fast.organs import CANONICAL_ORGANS, NUM_CLASSES

# The format of a prepared dataset (lad_fast.data.prepared reads and writes it).
SCHEMA_VERSION = 1
IMAGE_DTYPE = np.float16
MASK_DTYPE = np.uint8
STRUCTURE_DTYPE = np.int64
# An entry's "window": how its slice window was chosen. "centre": without a mask (chosen again when one
# arrives); "mask": from the mask prepare read; WINDOW_LATER_MASK: from a mask imported after prepare.
WINDOW_LATER_MASK = "later mask"


def reprepare_command(dataset: str | Path, index: Mapping[str, Any] | None = None) -> str:
    """``lad-fast prepare SRC DATASET --preset P``: the sources the index records (``SRC`` for an index
    that records none), the dataset's folder and its preset. Prepare skips the intact cases."""
    index = index if isinstance(index, Mapping) else {}
    source = index.get("source")
    words = ["lad-fast", "prepare", source if isinstance(source, str) and source else "SRC", str(dataset)]
    preset = index.get("preset")
    if isinstance(preset, str) and preset:
        words += ["--preset", preset]
    return " ".join(w if w == "SRC" else shlex.quote(w) for w in words)


def read_index(index_path: Path) -> Any:
    """The parsed JSON of ``index_path`` (not yet checked: :func:`check_index`). InputError naming the file
    for bytes that are not UTF-8 and for text that is not JSON; OSError (unreadable) passes through."""
    # prepare never overwrites a file it cannot tell it wrote, so the damaged one is moved out first
    fix = f"move it out of the folder and re-prepare the dataset: `{reprepare_command(index_path.parent)}`"
    data = index_path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{index_path}: damaged, byte {exc.start} is not UTF-8 text ({exc.reason}); {fix}"
        ) from None
    except ValueError as exc:
        raise InputError(f"{index_path}: damaged, not valid JSON ({exc}); {fix}") from None


def _is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def entry_problem(entry: object) -> str | None:
    """What is wrong with one ``index.json`` case entry, as words to follow its id; None when it is well
    formed. The id itself is checked by the caller (:func:`lad_fast.utils.safepaths.plain_name`)."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    if not isinstance(entry.get("has_mask"), bool):
        return "has no 'has_mask' (true or false)"
    if not isinstance(entry.get("content_hash"), str):
        return "has no 'content_hash' (the hash of its sources)"
    for key in ("image_hash", "mask_hash"):  # absent in indexes written before they existed
        if entry.get(key) is not None and not _is_hex_digest(entry[key]):
            return f"has a malformed {key!r} {entry[key]!r}"
    affine = entry.get("affine")
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.shape != (4, 4) or not np.all(np.isfinite(a)):
        return "has no finite 4 x 4 'affine'"
    if entry.get("window") == WINDOW_LATER_MASK:
        start = entry.get("crop", {}).get("start") if isinstance(entry.get("crop"), dict) else None
        if not (isinstance(start, list) and start and isinstance(start[0], int)):
            return "has no 'crop' start, which its re-chosen slice window needs"
    return None


def check_index(index: Any, index_path: Path) -> GeometryConfig:
    """Check a parsed ``index.json`` (schema version, preset, geometry, organ list, every case entry);
    return its geometry. InputError naming ``index_path``, the case and the command that re-prepares it."""
    from lad_fast.utils.safepaths import plain_name

    folder = index_path.parent
    if not isinstance(index, dict):
        raise InputError(
            f"{index_path}: damaged, holds a JSON {type(index).__name__}, not an object; move it out of the "
            f"folder and re-prepare the dataset: `{reprepare_command(folder)}`"
        )
    fix = f"re-prepare the dataset: `{reprepare_command(folder, index)}`"
    version = index.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{index_path}: schema version {version!r}, this lad-fast reads {SCHEMA_VERSION}; re-prepare the "
            f"dataset with this version's `lad-fast prepare` (`{reprepare_command(folder, index)}`)"
        )
    for key, kind in (("preset", str), ("geometry", dict), ("organs", list), ("cases", list)):
        if not isinstance(index.get(key), kind):
            kind_name = "JSON object" if kind is dict else kind.__name__
            what = "missing" if key not in index else f"not a {kind_name}"
            raise InputError(f"{index_path}: damaged, its {key!r} is {what}; {fix}")
    try:
        geometry = config_from_dict({"geometry": index["geometry"]}).geometry
    except ConfigError as exc:
        raise InputError(f"{index_path}: damaged, its 'geometry' is not a geometry ({exc}); {fix}") from None
    if not all(isinstance(n, int) and n > 0 for n in geometry.shape) or not all(
        isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in geometry.spacing
    ):
        raise InputError(f"{index_path}: damaged, its 'geometry' has an impossible shape or spacing; {fix}")
    if index["organs"] != list(CANONICAL_ORGANS):
        raise InputError(
            f"{index_path}: prepared with another organ list ({len(index['organs'])} organs, this lad-fast "
            f"has {NUM_CLASSES}), so its mask ids mean other organs; {fix}"
        )
    if index.get("image_dtype", "float16") != np.dtype(IMAGE_DTYPE).name:
        raise InputError(f"{index_path}: its image_dtype {index['image_dtype']!r} is not float16; {fix}")
    for position, entry in enumerate(index["cases"]):
        case_id = entry.get("id") if isinstance(entry, dict) else None
        plain_name(case_id, "case id", index_path, "the index was edited; re-prepare the dataset")
        problem = entry_problem(entry)
        if problem is not None:
            raise InputError(f"{index_path}: case {case_id!r} (entry {position}) {problem}; {fix}")
    return geometry


def _load(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.load(path, mmap_mode="r"), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, ValueError) as exc:
        return None, f"{path.name} cannot be read ({exc})"


def case_problem(folder: Path, entry: Mapping[str, Any], shape: tuple[int, ...]) -> str | None:
    """What is wrong with the arrays of the case ``entry`` describes in ``folder`` (None: nothing).

    Checks ``image.npy`` (D, H, W) float16: the shape, finiteness and, when the entry records one, its
    ``image_hash``; with a mask, ``mask.npy`` (D, H, W) uint8: the shape, ids below the number of
    canonical organs and, with ``structure.npy``, the entry's ``mask_hash``. Reads every array once.
    """
    from lad_fast.data.digest import image_hash, mask_hash

    image, problem = _load(folder / "image.npy")
    if problem is not None:
        return problem
    if image.shape != tuple(shape) or image.dtype != IMAGE_DTYPE:
        return f"image.npy is a {image.dtype} array of shape {image.shape}, not float16 {tuple(shape)}"
    values = np.ascontiguousarray(image)
    # float16 is NaN or Inf exactly when its 5 exponent bits are all ones; 10x faster than np.isfinite
    bad = int(np.count_nonzero((values.view(np.uint16) & 0x7C00) == 0x7C00))
    if bad:
        return f"image.npy holds {bad} NaN or Inf voxel{'' if bad == 1 else 's'}"
    recorded = entry.get("image_hash")
    if recorded is not None and image_hash(values) != recorded:
        return "image.npy differs from the array prepare wrote (its hash does not match the index)"
    if not entry.get("has_mask"):
        return None
    mask, problem = _load(folder / "mask.npy")
    if problem is not None:
        return problem
    structure, problem = _load(folder / "structure.npy")
    if problem is not None:
        return problem
    if mask.shape != tuple(shape) or mask.dtype != MASK_DTYPE:
        return f"mask.npy is a {mask.dtype} array of shape {mask.shape}, not uint8 {tuple(shape)}"
    labels = np.ascontiguousarray(mask)
    top = int(labels.max()) if labels.size else 0
    if top >= NUM_CLASSES:
        return f"mask.npy holds id {top}, but canonical organ ids run 0..{NUM_CLASSES - 1}"
    if structure.ndim != 1 or structure.dtype != STRUCTURE_DTYPE:
        return f"structure.npy is a {structure.dtype} array of shape {structure.shape}, not int64 (n,)"
    recorded = entry.get("mask_hash")
    if recorded is not None and mask_hash(labels, structure) != recorded:
        return "mask.npy or structure.npy differs from what was written (its hash does not match the index)"
    return None


__all__ = [
    "case_problem",
    "check_index",
    "entry_problem",
    "read_index",
    "reprepare_command",
]
