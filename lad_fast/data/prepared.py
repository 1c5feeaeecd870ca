"""Prepared datasets: what ``lad-fast prepare`` writes and what training reads (DESIGN.md "Prepared dataset").

Layout of a prepared folder::

    index.json                 schema_version, preset, geometry, organs, layout, cases: [...]
    cases/<id>/image.npy       (D, H, W) float16 in [-1, 1]
    cases/<id>/mask.npy        (D, H, W) uint8 canonical organ ids      (cases with a mask)
    cases/<id>/structure.npy   (n,) int64 structure condition           (cases with a mask)

A case entry records ``content_hash`` (of its sources) and ``mask_hash`` (of its mask and structure
arrays; :mod:`lad_fast.data.digest`); :meth:`PreparedDataset.content_hash` combines them into the
dataset's one data hash. After ``prepare``, masks are added or replaced only through
:meth:`PreparedDataset.set_masks` (imported or predicted masks), which owns the case files and the index.
This module is the prepared format's one owner (prepare writes it, the class reads it and later writes
masks into it), hence a little over 450 lines.

Images are stored as float16: values lie in [-1, 1] where float16's step is at most 2**-10, i.e. under
0.7 HU of the 1400 HU window (rounding error at most 0.35 HU, below the 1 HU step of int16 CT), and it
halves disk and read bandwidth against float32. Every array loads with ``np.load(mmap_mode="r")``.

Writing is safe to interrupt: every case folder is assembled under a hidden temporary name and renamed
into place whole (:func:`lad_fast.atomic.atomic_dir`), and ``index.json`` is rewritten atomically after
each case, so it always lists exactly the complete cases. A rerun skips a case whose id, source content
hash and vocabulary match the index.

Bad input is found as early as possible: discovery, file headers (dimensions, image/mask shapes and
affines, "too small") and DICOM series (read in full, as their consistency needs every header) are
checked for every case before ``out`` is created. Problems only visible in the voxels (NaN, truncated
data, label ids outside the vocabulary with ``strict``) raise before that case's folder is renamed into
place; when no case was written yet and this run created ``out``, it is removed again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.atomic import write_json
from lad_fast.config import ConditionConfig, GeometryConfig, LadConfig, config_from_dict, config_to_dict
from lad_fast.data.digest import dataset_hash, mask_hash, mask_hash_of_folder, source_hash
from lad_fast.data.labels import CANONICAL_ORGANS
from lad_fast.errors import InputError, OutputExistsError
from lad_fast.lock import LOCK_NAME, locks_folder

SCHEMA_VERSION = 1
INDEX = "index.json"
CASES = "cases"
IMAGE_DTYPE = np.float16


@dataclass(frozen=True)
class _Plan:
    """One case to prepare: where it comes from and which label vocabulary its mask uses."""

    case_id: str
    image: Path
    mask: Path | None
    vocabulary: str | dict[int, str] | None
    vocabulary_name: str | None


# ------------------------------------------------------------------------------------------ validation


def _resolve_vocabulary(case: Any, vocabulary: str, user_map: dict[int, str] | None, label_map: Path | None):
    """(vocabulary for to_canonical, its name for index.json); the command line wins over the layout."""
    if case.mask is None:
        return None, None
    if user_map is not None:
        return user_map, f"map:{Path(label_map).name}"
    if vocabulary != "auto":
        return vocabulary, vocabulary
    if case.label_map:
        return dict(case.label_map), "map:layout"
    if case.vocabulary:
        return case.vocabulary, case.vocabulary
    raise InputError(
        f"{case.mask}: cannot tell which label ids this mask uses; pass --vocabulary "
        "(totalseg, abdomenct1k, lad, canonical) or --label-map FILE.json"
    )


def _validate_headers(plan: _Plan, geom: GeometryConfig) -> None:
    """Everything checkable without reading a NIfTI's voxels (a DICOM series is read: see the module)."""
    from lad_fast.data.checks import nifti_header
    from lad_fast.data.geometry import check_coverage
    from lad_fast.data.io import check_pair, is_nifti, read_image
    from lad_fast.data.volume import Volume

    def header_of(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:  # None: DICOM, organ folder
        return nifti_header(path) if path.is_file() and is_nifti(path) else None

    header = header_of(plan.image)
    if header is None:
        vol = read_image(plan.image)  # DICOM series: mixed series, spacing and orientation show only here
        header = (vol.shape, vol.affine)
    check_coverage(header[0], header[1], geom, str(plan.image))
    mask_header = header_of(plan.mask) if plan.mask is not None else None
    if mask_header is not None:
        # check_pair reads shapes and affines only: zero-stride placeholders stand in for the voxels.
        def placeholder(h, src):
            return Volume(np.broadcast_to(np.zeros((), np.uint8), h[0]), h[1], str(src))

        check_pair(placeholder(header, plan.image), placeholder(mask_header, plan.mask))


def _is_ours(name: str) -> bool:
    # index.json, cases/, the writer's lock, and the hidden temporaries atomic writes leave when killed.
    return name in (INDEX, CASES, LOCK_NAME) or (name.startswith(f".{INDEX}.") and name.endswith(".tmp"))


def _check_out(out: Path, cfg: LadConfig, force: bool) -> dict[str, dict]:
    """Refuse an output folder holding other files (unless ``force``); return the complete cases of a
    previous run at the same geometry, by id."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another output folder")
    if not out.is_dir():
        return {}
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{out}: folder holds files prepare did not write ({shown}); choose an empty or new folder, "
            "or pass --force to prepare into it anyway"
        )
    index_path = out / INDEX
    if not index_path.is_file():
        return {}
    old: Any = None
    try:
        old = json.loads(index_path.read_text())
        same = (
            old.get("schema_version") == SCHEMA_VERSION
            and old.get("geometry") == json.loads(json.dumps(config_to_dict(cfg.geometry)))
            and old.get("organs") == list(CANONICAL_ORGANS)
        )
        cases = {c["id"]: c for c in old.get("cases", [])}
    except (ValueError, TypeError, KeyError, AttributeError):
        same, cases = False, {}
    if not (isinstance(old, dict) and "schema_version" in old and "cases" in old):  # not ours: kept
        raise OutputExistsError(
            f"{index_path}: not an index prepare wrote; move it out of the folder or choose another one "
            "(--force never overwrites files lad-fast did not write)"
        )
    if not same:
        if not force:
            was = repr(old.get("preset"))
            raise OutputExistsError(
                f"{index_path}: folder holds a dataset prepared at preset {was} (or by another lad-fast "
                f"version), not {cfg.preset!r}; choose a new folder, or pass --force to re-prepare it"
            )
        return {}
    return cases


CASE_FILES = ("image.npy", "mask.npy", "structure.npy")  # all prepare writes in cases/<id>/


# ------------------------------------------------------------------------------------------ one case


def _is_complete(entry: dict | None, folder: Path, digest: str, vocabulary_name: str | None) -> bool:
    if entry is None or entry.get("content_hash") != digest or entry.get("vocabulary") != vocabulary_name:
        return False
    names = ["image.npy"] + (["mask.npy", "structure.npy"] if entry.get("has_mask") else [])
    return all((folder / n).is_file() for n in names)


def _prepare_one(plan: _Plan, cfg: LadConfig, strict: bool, folder: Path, digest: str) -> dict[str, Any]:
    """Read, check and prepare one case into ``folder`` (a temporary one); return its index entry."""
    from lad_fast.atomic import atomic_path
    from lad_fast.conditions import structure_condition
    from lad_fast.data.checks import refuse_label_map
    from lad_fast.data.geometry import prepare_case
    from lad_fast.data.io import check_pair, read_image, read_labels
    from lad_fast.data.labels import to_canonical

    image = read_image(plan.image)
    refuse_label_map(image.array, str(plan.image))
    labels = canonical = None
    unknown: list[int] = []
    if plan.mask is not None:
        labels = read_labels(plan.mask)
        check_pair(image, labels)
        canonical, unknown = to_canonical(
            labels.array, plan.vocabulary, affine=labels.affine, strict=strict, source=str(plan.mask)
        )
    case = prepare_case(image, labels, cfg.geometry, label_array=canonical)

    def save(name: str, array: np.ndarray) -> None:
        with atomic_path(folder / name, suffix=".npy") as tmp:
            np.save(tmp, array)

    save("image.npy", case.image.astype(IMAGE_DTYPE))
    digest_of_mask = None
    if case.mask is not None:
        structure = np.asarray(structure_condition(case.mask, cfg.condition), dtype=np.int64)
        save("mask.npy", case.mask)
        save("structure.npy", structure)
        digest_of_mask = mask_hash(case.mask, structure)
    return {
        "id": plan.case_id,
        "image_source": str(plan.image),
        "mask_source": None if plan.mask is None else str(plan.mask),
        "content_hash": digest,
        "crop": case.crop_box(),
        "affine": np.asarray(case.affine).tolist(),
        "vocabulary": plan.vocabulary_name,
        "unknown_labels": [int(i) for i in unknown],
        "shape": list(case.image.shape),
        "has_mask": case.mask is not None,
        "mask_hash": digest_of_mask,
    }


# ------------------------------------------------------------------------------------------- dataset


@locks_folder("out", "prepare")  # one writer per prepared folder (prepare, predict-masks, import-masks)
def prepare_dataset(
    src: Path | str,
    out: Path | str,
    cfg: LadConfig,
    layout: str = "auto",
    vocabulary: str = "auto",
    label_map: Path | str | None = None,
    strict: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Prepare every case under ``src`` at ``cfg``'s geometry into ``out``; return the index (as written).

    ``layout``: "auto" or a layout of :func:`lad_fast.data.layouts.discover`. ``vocabulary``: label ids
    of the masks ("auto": the layout's guess). ``label_map``: a JSON file {"<id>": "<canonical organ>"}
    that overrides both. ``strict``: label ids outside the vocabulary are an error (else a warning).
    ``force``: prepare into a folder that holds other files, or one prepared at another geometry.
    """
    from lad_fast.atomic import atomic_dir
    from lad_fast.data.checks import check_case_folder
    from lad_fast.data.labels import load_user_map
    from lad_fast.data.layouts import discover
    from lad_fast.progress import track
    from lad_fast.safepaths import inside

    src, out = Path(src), Path(out)
    user_map = load_user_map(Path(label_map)) if label_map is not None else None
    layout_name, sources = discover(src, layout)
    plans = []
    for case in sources:
        vocab, name = _resolve_vocabulary(case, vocabulary, user_map, label_map)
        plans.append(_Plan(case.case_id, Path(case.image), case.mask and Path(case.mask), vocab, name))
    ids = [p.case_id for p in plans]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(
            f"{src}: case ids occur twice ({', '.join(dup)}); rename the files so ids are unique"
        )
    previous = _check_out(out, cfg, force)
    for plan in plans:
        check_case_folder(inside(out, CASES, plan.case_id), CASE_FILES)
        _validate_headers(plan, cfg.geometry)

    index: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "preset": cfg.preset,
        "geometry": config_to_dict(cfg.geometry),
        "organs": list(CANONICAL_ORGANS),
        "layout": layout_name,
        "image_dtype": np.dtype(IMAGE_DTYPE).name,
        "cases": [],
    }
    created = not out.exists()
    written = 0
    try:
        for plan in track(plans, "prepare"):
            folder = out / CASES / plan.case_id
            extra = json.dumps(plan.vocabulary, sort_keys=True, default=str)
            digest = source_hash([plan.image, plan.mask], extra)
            entry = previous.get(plan.case_id)
            if not _is_complete(entry, folder, digest, plan.vocabulary_name):
                with atomic_dir(folder) as tmp:
                    entry = _prepare_one(plan, cfg, strict, tmp, digest)
                written += 1
            index["cases"].append(entry)
            write_json(out / INDEX, index)
    except BaseException:
        # Nothing of this run is visible yet: leave no trace of the folders this run created.
        if written == 0:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            elif (out / CASES).is_dir() and not any((out / CASES).iterdir()):
                (out / CASES).rmdir()
        raise
    return index


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
        try:
            index = json.loads(index_path.read_text())
        except ValueError as exc:
            raise InputError(f"{index_path}: not valid JSON ({exc}); re-prepare the dataset") from None
        version = index.get("schema_version") if isinstance(index, dict) else None
        if version != SCHEMA_VERSION:
            raise InputError(
                f"{index_path}: schema version {version!r}, this lad-fast reads {SCHEMA_VERSION}; "
                "re-prepare the dataset with this version's `lad-fast prepare`"
            )
        preset = index.get("preset")
        if expect_preset is not None and preset != expect_preset:
            raise InputError(
                f"{self.path}: prepared at preset {preset!r}, but {expect_preset!r} is needed; re-prepare it "
                f"with `lad-fast prepare SRC OUT --preset {expect_preset}`"
            )
        self.preset: str = preset
        self.geometry: GeometryConfig = config_from_dict({"geometry": index["geometry"]}).geometry
        self._adopt(index)

    def _adopt(self, index: dict) -> None:
        from lad_fast.safepaths import plain_name

        cases = index.get("cases")
        if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
            raise InputError(f"{self.path / INDEX}: its case list is damaged; re-prepare the dataset")
        for c in cases:  # an id becomes a folder name: cases/../../victim must never be reached
            plain_name(
                c.get("id"), "case id", self.path / INDEX, "the index was edited; re-prepare the dataset"
            )
        self.index = index
        self._cases: list[dict] = list(cases)

    def case_dir(self, case_id: str) -> Path:
        """``<dataset>/cases/<case_id>``, checked to lie inside the dataset (symbolic links followed)."""
        from lad_fast.safepaths import inside, plain_name

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
            cases.append((entry["id"], entry.get("content_hash"), digest))
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
        from lad_fast.atomic import atomic_path
        from lad_fast.conditions import structure_condition
        from lad_fast.data.labels import validate_mask

        arrays = {}
        for case_id, (mask, source) in masks.items():
            self.entry(case_id)  # an unknown id raises, naming the cases
            self.case_dir(case_id)  # and one outside the dataset (a linked folder) before anything is written
            m = validate_mask(mask, tuple(self.geometry.shape), f"case {case_id} ({source})")
            arrays[case_id] = (m, np.asarray(structure_condition(m, condition), dtype=np.int64), str(source))
        if not arrays:
            return []
        index_path = self.path / INDEX
        try:
            unchanged = json.loads(index_path.read_text()) == self.index
        except (OSError, ValueError):
            unchanged = False
        if not unchanged:
            raise InputError(
                f"{index_path}: changed on disk since this dataset was opened (another process writing "
                "masks?); open the dataset again and retry"
            )
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

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self._cases[i]
        folder = self.case_dir(entry["id"])

        def load(name: str, mmap: bool = True) -> np.ndarray:
            try:
                return np.load(folder / name, mmap_mode="r" if mmap else None)
            except (OSError, ValueError) as exc:
                raise InputError(f"{folder / name}: cannot read ({exc}); re-prepare the dataset") from None

        has_mask = entry["has_mask"]
        return {
            "id": entry["id"],
            "image": load("image.npy"),
            "mask": load("mask.npy") if has_mask else None,
            "structure": load("structure.npy", mmap=False) if has_mask else None,
            "affine": np.asarray(entry["affine"], dtype=np.float64),
        }


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
