"""Digests of a prepared dataset: of a case's sources, of its arrays, and of the whole dataset.

Four digests, each a SHA-256 in hex (64 digits):

* :func:`source_hash` -> the case entry's ``content_hash`` in ``index.json``: the bytes of the source
  image and mask files and the label vocabulary they were read with (``prepare`` skips a case whose
  sources hash the same on a rerun);
* :func:`image_hash` -> the case entry's ``image_hash``: the prepared ``image.npy``, so that a job
  opening the dataset can verify the array it reads (:mod:`lad_fast.data.integrity`);
* :func:`mask_hash` -> the case entry's ``mask_hash``: the prepared ``mask.npy`` and ``structure.npy``
  arrays, whoever wrote them (``prepare``, an imported or a predicted mask);
* :func:`dataset_hash` -> :meth:`lad_fast.data.prepared.PreparedDataset.content_hash`, the one "data
  hash" that checkpoint metadata (``meta.json`` ``data_hash``) and the diffusion latent cache record.

The dataset hash covers exactly: the preset geometry (shape, spacing, HU window, ...), the canonical
organ list, the image dtype, and per case, sorted by id: its id, its source ``content_hash`` (from which
``image.npy`` is made) and, for a case with a mask, its ``mask_hash`` (recomputed from the arrays when an
index written before ``mask_hash`` existed lacks it). So it changes when a case is added or removed, a
source changes, the geometry changes, or a mask or structure condition is added or replaced by other
values. It leaves out, so rewriting them keeps the hash: the order of cases in ``index.json`` and its
formatting, the preset's name, paths (the dataset's folder, ``image_source``, ``mask_source``: the same
masks predicted again by a run in another folder keep the hash), fields derived from the sources and the
geometry (crop, affine, shape, unknown labels, ``image_hash``, ``source``) and any other file. It trusts
that ``image.npy`` is what ``prepare`` makes of the sources (another lad-fast version's prepare is not
told apart; ``image_hash`` verifies the array, the sources identify it). One exception
to "derived": when a mask imported after ``prepare`` chose the slice window again, the window's first
slice joins the case's ``content_hash`` (:func:`lad_fast.data.prepared.image_identity`), since the image
is then another crop of the same sources.

``content_hash(masks=False)`` leaves the masks out: the identity of the images alone. The VQ-GAN
records that one, because the pipeline predicts masks for unlabelled cases after phase 1 and a
``--resume`` of phase 1 must still find the data it was trained on; the segmenter, the diffusion model
and the latent cache, which learn from or encode the masks, record the full hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.errors import InputError

# Part of what is hashed: a later definition of the dataset hash changes this tag, so a hash of the old
# definition never equals one of the new.
DATASET_HASH_VERSION = "lad-fast prepared dataset content v1"


def source_hash(paths: list[Path | None], extra: str = "") -> str:
    """sha256 over the bytes of the source files (folders: every file, by relative path) and ``extra``."""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            h.update(b"\0none\0")
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
    h.update(extra.encode())
    return h.hexdigest()


def image_hash(image: np.ndarray) -> str:
    """sha256 of a prepared image (D, H, W) as little-endian float16 (the stored dtype), preceded by its
    shape: the values, independent of the file's layout."""
    a = np.ascontiguousarray(np.asarray(image), dtype=np.dtype("<f2"))
    h = hashlib.sha256(f"image{list(a.shape)}\0".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def mask_hash(mask: np.ndarray, structure: np.ndarray) -> str:
    """sha256 of a case's mask (D, H, W) as uint8 and its structure condition (n,) as little-endian int64,
    each preceded by its shape: the values, independent of the file's layout or the array's dtype."""
    h = hashlib.sha256()
    for name, array, dtype in (("mask", mask, np.uint8), ("structure", structure, np.dtype("<i8"))):
        a = np.ascontiguousarray(np.asarray(array), dtype=dtype)
        h.update(f"{name}{list(a.shape)}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def mask_hash_of_folder(folder: Path) -> str:
    """:func:`mask_hash` of a prepared case folder's ``mask.npy`` and ``structure.npy``."""
    try:
        mask, structure = np.load(folder / "mask.npy", mmap_mode="r"), np.load(folder / "structure.npy")
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot read its mask arrays ({exc}); re-prepare the dataset") from None
    return mask_hash(mask, structure)


def dataset_hash(
    geometry: dict[str, Any],
    organs: list[str],
    image_dtype: str,
    cases: Iterable[tuple[str, str, str | None]],
    masks: bool = True,
) -> str:
    """sha256 of :data:`DATASET_HASH_VERSION`, ``masks``, the geometry dict, the organ list, the image
    dtype and the ``(id, content_hash, mask_hash or None)`` of every case, sorted by id, as one canonical
    JSON text. ``masks`` only tells the two scopes apart; the caller leaves the mask hashes None without."""
    blob = {
        "definition": DATASET_HASH_VERSION,
        "masks": bool(masks),
        "geometry": geometry,
        "organs": list(organs),
        "image_dtype": image_dtype,
        "cases": sorted([str(i), c, m] for i, c, m in cases),
    }
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
