"""``lad-fast prepare``: source CT and masks to a prepared dataset (:mod:`lad_fast.data.prepared`).

Writing is safe to interrupt: every case folder is assembled under a hidden temporary name and renamed
into place whole (:func:`lad_fast.utils.atomic.atomic_dir`), and ``index.json`` is rewritten atomically after
each case, so it always lists exactly the complete cases. A rerun skips a case whose id, source content
hash and vocabulary match the index and whose arrays still match the entry's hashes
(:mod:`lad_fast.data.integrity`): a damaged case or entry is prepared again, never copied forward, so the
rerun is also the repair every refusal of a damaged dataset names.

Bad input is found as early as possible: discovery, file headers (dimensions, image/mask shapes and
affines, "too small") and DICOM series (read in full, as their consistency needs every header) are
checked for every case before ``out`` is created. Problems only visible in the voxels (NaN, truncated
data, label ids outside the vocabulary with ``strict``) raise before that case's folder is renamed into
place; when no case was written yet and this run created ``out``, it is removed again.

With ``skip_invalid`` a case whose input is bad (any :class:`InputError` about its files) is left out
instead: every other case is prepared, and ``prepare_report.json`` names each skipped case and why. A
real dataset of hundreds of scans always holds a few that are cropped too tightly or broken.

A case prepared without a mask has its slice window centred (``"window": "centre"`` in its entry); when
a mask arrives later (:func:`lad_fast.data.masks.import_masks`), the window is chosen again from it, so
the entry keeps ``image_source`` as an absolute path and ``content_hash`` to find and verify the source.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.config import GeometryConfig, LadConfig, config_to_dict
from lad_fast.data.digest import image_hash, mask_hash, source_hash
from lad_fast.data.integrity import (
    SCHEMA_VERSION,
    case_problem,
    check_index,
    entry_problem,
    read_index,
)
from lad_fast.data.labels import CANONICAL_ORGANS
from lad_fast.data.prepared import CASE_FILES, CASES, IMAGE_DTYPE, INDEX
from lad_fast.errors import InputError, OutputExistsError
from lad_fast.utils.atomic import write_json
from lad_fast.utils.lock import LOCK_NAME, locks_folder
from lad_fast.utils.safepaths import is_plain_name

REPORT = "prepare_report.json"  # written by prepare --skip-invalid: the cases left out and why


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
    temporary = any(name.startswith(f".{n}.") and name.endswith(".tmp") for n in (INDEX, REPORT))
    return name in (INDEX, CASES, LOCK_NAME, REPORT) or temporary


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
    try:
        old = read_index(index_path)
    except InputError:
        old = None  # bad bytes or bad JSON: lad-fast cannot tell it wrote this file
    if not (isinstance(old, dict) and "schema_version" in old and "cases" in old):  # not ours: kept
        raise OutputExistsError(
            f"{index_path}: not an index prepare wrote; move it out of the folder or choose another one "
            "(--force never overwrites files lad-fast did not write)"
        )
    try:
        check_index(old, index_path)
        damaged = False
    except InputError:
        damaged = True
    same = (
        old.get("schema_version") == SCHEMA_VERSION
        and old.get("geometry") == json.loads(json.dumps(config_to_dict(cfg.geometry)))
        and old.get("organs") == list(CANONICAL_ORGANS)
    )
    if not same:
        if damaged and old.get("preset") == cfg.preset:
            return {}  # our index of this preset, damaged: every case is prepared again
        if not force:
            was = repr(old.get("preset"))
            raise OutputExistsError(
                f"{index_path}: folder holds a dataset prepared at preset {was} (or by another lad-fast "
                f"version), not {cfg.preset!r}; choose a new folder, or pass --force to re-prepare it"
            )
        return {}
    # Only well-formed entries are candidates for reuse: a damaged one is prepared again, never copied.
    cases = old["cases"] if isinstance(old["cases"], list) else []
    well_formed = [c for c in cases if isinstance(c, dict) and is_plain_name(c.get("id"))]
    return {c["id"]: c for c in well_formed if entry_problem(c) is None}


# ------------------------------------------------------------------------------------------ one case


def _reusable(
    entry: dict | None, folder: Path, digest: str, vocabulary_name: str | None, shape: tuple[int, ...]
) -> dict | None:
    """The previous run's entry of a case when its sources, vocabulary and arrays are still what it
    describes (:func:`lad_fast.data.integrity.case_problem`), else None: the case is prepared again. An
    entry written before ``image_hash`` existed gets it here."""
    if entry is None or entry.get("content_hash") != digest or entry.get("vocabulary") != vocabulary_name:
        return None
    if case_problem(folder, entry, shape) is not None:
        return None
    if entry.get("image_hash") is None:
        entry = {**entry, "image_hash": image_hash(np.load(folder / "image.npy", mmap_mode="r"))}
    return entry


def _prepare_one(plan: _Plan, cfg: LadConfig, strict: bool, folder: Path, digest: str) -> dict[str, Any]:
    """Read, check and prepare one case into ``folder`` (a temporary one); return its index entry."""
    from lad_fast.conditioning.conditions import structure_condition
    from lad_fast.data.checks import refuse_label_map
    from lad_fast.data.geometry import prepare_case
    from lad_fast.data.io import check_pair, read_image, read_labels
    from lad_fast.data.labels import to_canonical
    from lad_fast.utils.atomic import atomic_path

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

    image = case.image.astype(IMAGE_DTYPE)
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:  # the readers refuse NaN and Inf in the source; this guards every path to the array
        raise InputError(
            f"{plan.image}: {bad} prepared voxels are NaN or Inf; fill them in the source (e.g. with -1000 "
            "HU) and retry"
        )
    save("image.npy", image)
    digest_of_mask = None
    if case.mask is not None:
        structure = np.asarray(structure_condition(case.mask, cfg.condition), dtype=np.int64)
        save("mask.npy", case.mask)
        save("structure.npy", structure)
        digest_of_mask = mask_hash(case.mask, structure)
    return {
        "id": plan.case_id,
        # absolute: a mask imported later re-reads the image from here (whatever the working folder)
        "image_source": str(plan.image.absolute()),
        "mask_source": None if plan.mask is None else str(plan.mask),
        "content_hash": digest,
        "crop": case.crop_box(),
        "affine": np.asarray(case.affine).tolist(),
        "window": "centre" if case.mask is None else "mask",
        "vocabulary": plan.vocabulary_name,
        "unknown_labels": [int(i) for i in unknown],
        "shape": list(case.image.shape),
        "has_mask": case.mask is not None,
        "image_hash": image_hash(image),
        "mask_hash": digest_of_mask,
    }


# ------------------------------------------------------------------------------------------- dataset


def _reason(err: InputError, plan: _Plan) -> str:
    """An error's message without the leading file name (the report names the case and its files)."""
    text = str(err)
    for path in (plan.image, plan.mask):
        if path is not None and text.startswith(f"{path}: "):
            return text[len(f"{path}: ") :]
    return text


def skipped_summary(report: dict[str, Any]) -> str:
    """One line naming every case ``prepare --skip-invalid`` left out and why ("" when none was)."""
    skipped = report.get("skipped", [])
    if not skipped:
        return ""
    cases = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped)
    n = len(skipped)
    return f"skipped {n} invalid case{'' if n == 1 else 's'} (details in {report['path']}): {cases}"


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
    skip_invalid: bool = False,
) -> dict[str, Any]:
    """Prepare every case under ``src`` at ``cfg``'s geometry into ``out``; return the index (as written).

    ``layout``: "auto" or a layout of :func:`lad_fast.data.layouts.discover`. ``vocabulary``: label ids
    of the masks ("auto": the layout's guess). ``label_map``: a JSON file {"<id>": "<canonical organ>"}
    that overrides both. ``strict``: label ids outside the vocabulary are an error (else a warning).
    ``force``: prepare into a folder that holds other files, or one prepared at another geometry.
    ``skip_invalid``: a case whose files are bad (too small, truncated, NaN, a mask off its image's grid,
    unknown label ids with ``strict``, ...) is left out instead of stopping the run;
    ``out/prepare_report.json`` then lists ``{"source", "prepared": [ids], "skipped": [{"id", "image",
    "mask", "reason"}]}`` (:func:`skipped_summary` makes its one line). InputError when no case is left.
    """
    from lad_fast.data.checks import check_case_folder
    from lad_fast.data.labels import load_user_map
    from lad_fast.data.layouts import discover
    from lad_fast.utils.atomic import atomic_dir
    from lad_fast.utils.progress import track
    from lad_fast.utils.safepaths import inside

    src, out = Path(src), Path(out)
    user_map = load_user_map(Path(label_map)) if label_map is not None else None
    layout_name, sources = discover(src, layout)
    skipped: list[dict[str, Any]] = []

    def skip(plan: _Plan, err: InputError) -> None:
        if not skip_invalid:
            raise err
        mask = None if plan.mask is None else str(plan.mask)
        reason = _reason(err, plan)
        skipped.append({"id": plan.case_id, "image": str(plan.image), "mask": mask, "reason": reason})

    plans = []
    for case in sources:
        plan = _Plan(case.case_id, Path(case.image), case.mask and Path(case.mask), None, None)
        try:
            vocab, name = _resolve_vocabulary(case, vocabulary, user_map, label_map)
        except InputError as err:
            skip(plan, err)
            continue
        plans.append(_Plan(plan.case_id, plan.image, plan.mask, vocab, name))
    ids = [p.case_id for p in plans]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(
            f"{src}: case ids occur twice ({', '.join(dup)}); rename the files so ids are unique"
        )
    previous = _check_out(out, cfg, force)
    valid = []
    for plan in plans:
        check_case_folder(inside(out, CASES, plan.case_id), CASE_FILES)
        try:
            _validate_headers(plan, cfg.geometry)
        except InputError as err:
            skip(plan, err)
            continue
        valid.append(plan)

    index: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "preset": cfg.preset,
        "source": str(src.absolute()),  # what the command that re-prepares a damaged case names
        "geometry": config_to_dict(cfg.geometry),
        "organs": list(CANONICAL_ORGANS),
        "layout": layout_name,
        "image_dtype": np.dtype(IMAGE_DTYPE).name,
        "cases": [],
    }
    created = not out.exists()
    shape = tuple(cfg.geometry.shape)
    written = 0
    try:
        for plan in track(valid, "prepare"):
            folder = out / CASES / plan.case_id
            extra = json.dumps(plan.vocabulary, sort_keys=True, default=str)
            digest = source_hash([plan.image, plan.mask], extra)
            entry = _reusable(previous.get(plan.case_id), folder, digest, plan.vocabulary_name, shape)
            if entry is None:
                try:
                    with atomic_dir(folder) as tmp:
                        entry = _prepare_one(plan, cfg, strict, tmp, digest)
                except InputError as err:
                    skip(plan, err)  # the case's temporary folder is gone; a previous complete one is kept
                    continue
                written += 1
            index["cases"].append(entry)
            write_json(out / INDEX, index)
        if not index["cases"]:
            first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
            raise InputError(f"{src}: no case could be prepared, all {len(skipped)} are invalid ({first})")
    except BaseException:
        # Nothing of this run is visible yet: leave no trace of the folders this run created.
        if written == 0:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            elif (out / CASES).is_dir() and not any((out / CASES).iterdir()):
                (out / CASES).rmdir()
        raise
    report_path = out / REPORT
    if skip_invalid:
        prepared = [c["id"] for c in index["cases"]]
        write_json(report_path, {"source": str(src), "prepared": prepared, "skipped": skipped})
    elif report_path.is_file():
        report_path.unlink()  # a report of an earlier run would describe cases this run prepared
    return index


def read_report(out: Path | str) -> dict[str, Any]:
    """``out/prepare_report.json`` as written by :func:`prepare_dataset` with ``skip_invalid``, plus its
    ``path``; an empty report when there is none."""
    path = Path(out) / REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"path": str(path), "prepared": [], "skipped": []}
    return {**report, "path": str(path)}
