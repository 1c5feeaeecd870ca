"""Prepared datasets, read: :class:`PreparedDataset`, what training and generation open.

Layout of a prepared folder (written by :func:`lad_fast.data.prepare.prepare_dataset`)::

    index.json                 schema_version, preset, source, geometry, organs, layout, cases: [...]
    cases/<id>/image.npy       (D, H, W) float16 in [-1, 1]
    cases/<id>/mask.npy        (D, H, W) uint8 canonical organ ids      (cases with a mask)
    cases/<id>/structure.npy   (n,) int64 structure condition           (cases with a mask)

A case entry records ``content_hash`` (of its sources), ``image_hash`` (of its image array) and
``mask_hash`` (of its mask and structure arrays; :mod:`lad_fast.data.digest`);
:meth:`PreparedDataset.content_hash` combines the first and last into the dataset's one data hash.
``index.json`` is checked when the dataset is opened, and the arrays against their hashes by
:meth:`PreparedDataset.verify`, which every training and generation job calls
(:mod:`lad_fast.data.integrity`). After ``prepare``, masks are added or replaced only through
:meth:`PreparedDataset.set_masks` (imported or predicted masks on the case's grid) and
:meth:`PreparedDataset.replace_case` (a mask that re-chose the slice window of a case prepared without
one, image included), which own the case files and the index.

Images are stored as float16: values lie in [-1, 1] where float16's step is at most 2**-10, i.e. under
0.7 HU of the 1400 HU window (rounding error at most 0.35 HU, below the 1 HU step of int16 CT), and it
halves disk and read bandwidth against float32. Every array loads with ``np.load(mmap_mode="r")``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.config import ConditionConfig, GeometryConfig, config_to_dict
from lad_fast.data.digest import dataset_hash, image_hash, mask_hash, mask_hash_of_folder
from lad_fast.data.integrity import (  # the format's constants, defined beside its checks
    IMAGE_DTYPE,
    WINDOW_LATER_MASK,
    case_problem,
    check_index,
    read_index,
    reprepare_command,
)
from lad_fast.errors import InputError
from lad_fast.utils.atomic import write_json

INDEX = "index.json"
CASES = "cases"
CASE_FILES = ("image.npy", "mask.npy", "structure.npy")  # all prepare writes in cases/<id>/


# --------------------------------------------------------------------------------------------- reading


class PreparedDataset:
    """A prepared folder, read through ``index.json``; arrays are memory-mapped.

    ``dataset[i]`` -> ``{"id", "image" (D, H, W) float16 memmap in [-1, 1], "mask" (D, H, W) uint8 memmap or
    None, "structure" (n,) int64 or None, "affine" (4, 4)}``.
    """

    def __init__(self, path: Path | str, expect_preset: str | None = None) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise InputError(
                f"{self.path}: no {INDEX}; not a prepared dataset (make one with `lad-fast prepare SRC OUT`)"
            )
        index = read_index(index_path)
        self.geometry: GeometryConfig = check_index(index, index_path)
        preset = index["preset"]
        if expect_preset is not None and preset != expect_preset:
            raise InputError(
                f"{self.path}: prepared at preset {preset!r}, but {expect_preset!r} is needed; use it as "
                f"prepared with --preset {preset} (and models trained at that preset), or re-prepare it with "
                f"`lad-fast prepare SRC OUT --preset {expect_preset}`"
            )
        self.preset: str = preset
        self._verified: set[tuple] = set()
        self._adopt(index)

    def _adopt(self, index: dict) -> None:
        self.index = index
        self._cases: list[dict] = list(index["cases"])

    def reprepare_command(self) -> str:
        """The command that re-prepares this dataset's damaged cases (and skips the intact ones)."""
        return reprepare_command(self.path, self.index)

    def verify(self, indices: Iterable[int] | None = None) -> None:
        """Check the arrays of the cases at ``indices`` (default: every case) against the index, before a
        job uses them: image shape, dtype, finiteness and ``image_hash``; mask shape, ids and
        ``mask_hash`` (:func:`lad_fast.data.integrity.case_problem`). InputError naming the case and the
        command that re-prepares it. A case verified once is not read again by this object unless its
        entry changes (a mask added by :meth:`set_masks`).

        Cost: each array is read and hashed once (sha256, and a finiteness test on the float16 bits), a
        few hundredths of a second per ``lad`` case from the page cache (``bench/verify_prepared.py``
        measures it); from a cold disk, reading the arrays dominates.
        """
        shape = tuple(self.geometry.shape)
        for i in range(len(self)) if indices is None else indices:
            entry = self._cases[i]
            key = (entry["id"], entry.get("image_hash"), entry["has_mask"], entry.get("mask_hash"))
            if key in self._verified:
                continue
            problem = case_problem(self.case_dir(entry["id"]), entry, shape)
            if problem is not None:
                raise InputError(self.damaged(entry, problem))
            self._verified.add(key)

    def damaged(self, entry: Mapping[str, Any], problem: str) -> str:
        """The one-line refusal of a damaged case: which case, what is wrong, and how to re-prepare it."""
        again = ""
        source = str(entry.get("mask_source") or "")
        if source.startswith(("external:", "predicted:")):
            again = f", then give it its mask again (it came from {source})"
        return (
            f"{self.path}: case {entry['id']!r} is damaged: {problem}; re-prepare it with "
            f"`{self.reprepare_command()}` (which skips the intact cases){again}"
        )

    def case_dir(self, case_id: str) -> Path:
        """``<dataset>/cases/<case_id>``, checked to lie inside the dataset (symbolic links followed)."""
        from lad_fast.utils.safepaths import inside, plain_name

        plain_name(case_id, "case id", self.path / INDEX, "pass the id of one of its cases")
        return inside(self.path, CASES, case_id)

    @property
    def case_ids(self) -> list[str]:
        return [c["id"] for c in self._cases]

    def __len__(self) -> int:
        return len(self._cases)

    def labelled_indices(self) -> list[int]:
        """Indices of the cases that have a mask (read from the index; no array is opened)."""
        return [i for i, c in enumerate(self._cases) if c["has_mask"]]

    def entry(self, case_id: str) -> dict:
        """The index entry of ``case_id``."""
        for c in self._cases:
            if c["id"] == case_id:
                return c
        shown = ", ".join(self.case_ids[:5]) + (" ..." if len(self) > 5 else "")
        raise InputError(f"{self.path}: no case {case_id!r} (cases: {shown})")

    def content_hash(self, masks: bool = True) -> str:
        """The dataset's content hash (64 hex digits), the "data hash" checkpoints and caches record: the
        geometry, organ list, image dtype and each case's id, source ``content_hash`` and (``masks``)
        ``mask_hash``, sorted by id. ``masks=False``: the images' identity alone, which predicting or
        importing masks leaves unchanged. What it covers and leaves out: :mod:`lad_fast.data.digest`."""
        cases = []
        for entry in self._cases:
            digest = None
            if masks and entry["has_mask"]:  # indexes written before mask_hash existed: hash the arrays
                digest = entry.get("mask_hash") or mask_hash_of_folder(self.case_dir(entry["id"]))
            cases.append((entry["id"], image_identity(entry), digest))
        geometry = json.loads(json.dumps(config_to_dict(self.geometry)))
        dtype = self.index.get("image_dtype", "float16")
        return dataset_hash(geometry, self.index["organs"], dtype, cases, masks=masks)

    def set_masks(self, masks: Mapping[str, tuple[Any, str]], condition: ConditionConfig) -> list[str]:
        """Add or replace the masks of some cases; returns their ids (in the order of ``masks``).

        masks: ``{case id: (mask (D, H, W) canonical ids on the case's prepared grid, source)}``; ``source``
            is recorded as the case's ``mask_source`` (``"predicted:<run>"``, ``"external:<path>"``).
        condition: the config of the structure condition computed from each mask.

        Every mask is checked (:func:`lad_fast.data.labels.validate_mask`) and its structure condition
        computed before anything is written. Then each case's ``mask.npy`` (uint8) and ``structure.npy``
        (int64) are written atomically, and ``index.json`` is rewritten once, atomically, with
        ``has_mask``, ``mask_source`` and ``mask_hash``. Cases that had a mask are first withdrawn from the
        index (one more index write), so at every instant the index lists each case either without a
        mask or with the arrays its ``mask_hash`` describes. InputError for an unknown case id, an invalid
        mask, or an ``index.json`` that changed on disk since this dataset was opened.
        """
        from lad_fast.conditioning.conditions import structure_condition
        from lad_fast.data.labels import validate_mask
        from lad_fast.utils.atomic import atomic_path

        arrays = {}
        for case_id, (mask, source) in masks.items():
            self.entry(case_id)  # an unknown id raises, naming the cases
            self.case_dir(case_id)  # and one outside the dataset (a linked folder) before anything is written
            m = validate_mask(mask, tuple(self.geometry.shape), f"case {case_id} ({source})")
            arrays[case_id] = (m, np.asarray(structure_condition(m, condition), dtype=np.int64), str(source))
        if not arrays:
            return []
        index_path = self.path / INDEX
        self._check_unchanged(index_path)
        index = json.loads(json.dumps(self.index))  # a private copy: self.index follows the disk
        entries = {e["id"]: e for e in index["cases"]}
        replaced = [case_id for case_id in arrays if entries[case_id]["has_mask"]]
        for case_id in replaced:
            entries[case_id].update(has_mask=False, mask_source=None, mask_hash=None)
        if replaced:
            write_json(index_path, index)
            self._adopt(json.loads(json.dumps(index)))
        for case_id, (mask, structure, _) in arrays.items():
            for name, array in (("mask.npy", mask), ("structure.npy", structure)):
                with atomic_path(self.case_dir(case_id) / name, suffix=".npy") as tmp:
                    np.save(tmp, array)
        for case_id, (mask, structure, source) in arrays.items():
            entries[case_id].update(has_mask=True, mask_source=source, mask_hash=mask_hash(mask, structure))
        write_json(index_path, index)  # after every case's arrays: the index never lists a half case
        self._adopt(index)
        return list(arrays)

    def replace_case(
        self,
        case_id: str,
        image: np.ndarray,
        mask: np.ndarray,
        source: str,
        condition: ConditionConfig,
        fields: Mapping[str, Any],
    ) -> None:
        """Rewrite one case whole, image included: a mask that arrived later re-chose its slice window.

        image: (D, H, W) in [-1, 1] (stored as float16); mask: (D, H, W) canonical ids on the same grid;
        source: its ``mask_source``; fields: the entry's new ``crop``, ``affine`` and ``window``.

        The case folder is assembled under a temporary name and renamed into place whole. The case is
        withdrawn from ``index.json`` first and listed again, with its new entry at its old position,
        once its folder is complete, so at every instant the index lists a case only with the files its
        entry describes (a process killed in between leaves the case unlisted: `lad-fast prepare` of the
        same sources into the folder lists it again). On an error the old entry is listed again.
        """
        from lad_fast.conditioning.conditions import structure_condition
        from lad_fast.data.labels import validate_mask
        from lad_fast.utils.atomic import atomic_dir, atomic_path

        self.entry(case_id)
        folder = self.case_dir(case_id)
        shape = tuple(self.geometry.shape)
        if tuple(np.shape(image)) != shape:
            raise InputError(f"case {case_id}: image shape {np.shape(image)} differs from the preset {shape}")
        m = validate_mask(mask, shape, f"case {case_id} ({source})")
        structure = np.asarray(structure_condition(m, condition), dtype=np.int64)
        index_path = self.path / INDEX
        self._check_unchanged(index_path)
        index = json.loads(json.dumps(self.index))
        position = next(i for i, e in enumerate(index["cases"]) if e["id"] == case_id)
        old = index["cases"].pop(position)
        new = {**old, **json.loads(json.dumps(dict(fields)))}
        image = np.asarray(image, dtype=IMAGE_DTYPE)
        new.update(
            has_mask=True,
            mask_source=str(source),
            mask_hash=mask_hash(m, structure),
            image_hash=image_hash(image),
        )
        write_json(index_path, index)
        try:
            with atomic_dir(folder) as tmp:
                for name, array in (("image.npy", image), ("mask.npy", m), ("structure.npy", structure)):
                    dtype = IMAGE_DTYPE if name == "image.npy" else array.dtype
                    with atomic_path(tmp / name, suffix=".npy") as part:
                        np.save(part, np.asarray(array, dtype=dtype))
        except BaseException:
            index["cases"].insert(position, old)  # the old folder is still in place: list it again
            write_json(index_path, index)
            raise
        index["cases"].insert(position, new)
        write_json(index_path, index)
        self._adopt(index)

    def _check_unchanged(self, index_path: Path) -> None:
        try:
            unchanged = json.loads(index_path.read_text()) == self.index
        except (OSError, ValueError):
            unchanged = False
        if not unchanged:
            raise InputError(
                f"{index_path}: changed on disk since this dataset was opened (another process writing "
                "masks?); open the dataset again and retry"
            )

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self._cases[i]
        folder = self.case_dir(entry["id"])
        shape = tuple(self.geometry.shape)

        def load(name: str, mmap: bool = True) -> np.ndarray:
            try:
                array = np.load(folder / name, mmap_mode="r" if mmap else None)
            except (OSError, ValueError) as exc:
                problem = f"{name} cannot be read ({exc})"
                raise InputError(self.damaged(entry, problem)) from None
            if name != "structure.npy" and array.shape != shape:  # the header alone: free to check
                problem = f"{name} has shape {array.shape}, not the geometry's {shape}"
                raise InputError(self.damaged(entry, problem))
            return array

        has_mask = entry["has_mask"]
        return {
            "id": entry["id"],
            "image": load("image.npy"),
            "mask": load("mask.npy") if has_mask else None,
            "structure": load("structure.npy", mmap=False) if has_mask else None,
            "affine": np.asarray(entry["affine"], dtype=np.float64),
        }


def image_identity(entry: Mapping[str, Any]) -> str | None:
    """What the dataset hash records of a case's image: its sources' ``content_hash``, plus the slice
    window's first slice when a mask that arrived after ``prepare`` chose the window again (the image
    is then another crop of the same sources; :mod:`lad_fast.data.digest`)."""
    digest = entry.get("content_hash")
    if entry.get("window") == WINDOW_LATER_MASK and digest is not None:
        return f"{digest}:window:{int(entry['crop']['start'][0])}"
    return digest


def export_case_nifti(
    dataset_path: Path | str, case_id: str, out_dir: Path | str
) -> tuple[Path, Path | None]:
    """Write a prepared case back to NIfTI with its true affine: ``<id>_ct.nii.gz`` (int16 HU) and
    ``<id>_mask.nii.gz`` (uint8 canonical ids; None without a mask). Both overlay the source CT."""
    from lad_fast.data.geometry import dhw_to_nifti, unit_to_hu
    from lad_fast.data.io import write_nifti

    ds = PreparedDataset(dataset_path)
    item = ds[ds.case_ids.index(ds.entry(case_id)["id"])]
    out_dir = Path(out_dir)
    image_path = out_dir / f"{case_id}_ct.nii.gz"
    hu = unit_to_hu(np.asarray(item["image"], dtype=np.float32), ds.geometry.hu_window)
    write_nifti(image_path, *dhw_to_nifti(hu, item["affine"]), kind="image")
    if item["mask"] is None:
        return image_path, None
    mask_path = out_dir / f"{case_id}_mask.nii.gz"
    write_nifti(mask_path, *dhw_to_nifti(np.asarray(item["mask"]), item["affine"]), kind="labels")
    return image_path, mask_path
