"""PreparedDataset owns its files: set_masks (atomic mask writes) and content_hash (the one data hash)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import lad_fast.utils.atomic
from lad_fast.conditioning.conditions import structure_condition
from lad_fast.config import ConditionConfig, get_preset
from lad_fast.data.digest import mask_hash
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError

CONDITION = get_preset("tiny").condition


@pytest.fixture
def data(tiny_phantoms: Path, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_phantoms, tmp_path / "data")


def _index(data: Path) -> dict:
    return json.loads((data / "index.json").read_text())


def _box(ds: PreparedDataset, organ: str = "liver") -> np.ndarray:
    mask = np.zeros(tuple(ds.geometry.shape), np.uint8)
    mask[4:9, 20:40, 10:30] = CANONICAL_ID[organ]
    return mask


def _unlabel(data: Path, case: int) -> str:
    """Make case ``case`` unlabelled, as prepare writes a case without a mask."""
    index = _index(data)
    entry = index["cases"][case]
    entry.update(has_mask=False, mask_source=None, mask_hash=None)
    for name in ("mask.npy", "structure.npy"):
        (data / "cases" / entry["id"] / name).unlink()
    (data / "index.json").write_text(json.dumps(index))
    return entry["id"]


# ------------------------------------------------------------------------------------------ set_masks


def test_set_masks_writes_arrays_then_the_index_once(data, monkeypatch):
    case = _unlabel(data, 1)
    ds = PreparedDataset(data)
    writes = []
    real = lad_fast.utils.atomic.write_json
    monkeypatch.setattr("lad_fast.data.prepared.write_json", lambda p, o: (writes.append(p), real(p, o)))
    mask = _box(ds)
    assert ds.set_masks({case: (mask.astype(np.int64), "external:/x/m.nii.gz")}, CONDITION) == [case]
    assert writes == [data / "index.json"]

    entry = _index(data)["cases"][1]
    assert entry["has_mask"] and entry["mask_source"] == "external:/x/m.nii.gz"
    on_disk = np.load(data / "cases" / case / "mask.npy")
    structure = np.load(data / "cases" / case / "structure.npy")
    assert on_disk.dtype == np.uint8 and structure.dtype == np.int64
    np.testing.assert_array_equal(on_disk, mask)
    np.testing.assert_array_equal(structure, structure_condition(mask, CONDITION))
    assert entry["mask_hash"] == mask_hash(mask, structure)
    # The open dataset follows what it wrote; a fresh one reads the same.
    assert ds.labelled_indices() == [0, 1, 2] == PreparedDataset(data).labelled_indices()
    np.testing.assert_array_equal(ds[1]["mask"], mask)
    assert not any(p.name.startswith(".") for p in data.rglob("*"))  # no temporaries left


def test_set_masks_structure_follows_the_condition_config(data):
    ds = PreparedDataset(data)
    case = ds.case_ids[0]
    other = ConditionConfig(structure_organs=("background", "liver"))
    ds.set_masks({case: (_box(ds), "predicted:run")}, other)
    np.testing.assert_array_equal(ds[0]["structure"], structure_condition(_box(ds), other))
    assert not np.array_equal(ds[0]["structure"], structure_condition(_box(ds), CONDITION))


def test_replacing_a_mask_withdraws_it_from_the_index_first(data, monkeypatch):
    """Killed between the arrays and the index, a replaced case reads as unlabelled, never as the old
    mask's record over the new arrays."""
    ds = PreparedDataset(data)
    case = ds.case_ids[0]
    targets = []
    real = lad_fast.utils.atomic.atomic_path

    def die_at_the_structure(target, suffix=""):
        targets.append(Path(target).name)
        if targets[-1] == "structure.npy":  # the mask is written, the structure is not
            raise KeyboardInterrupt
        return real(target, suffix)

    monkeypatch.setattr(lad_fast.utils.atomic, "atomic_path", die_at_the_structure)
    with pytest.raises(KeyboardInterrupt):
        ds.set_masks({case: (_box(ds), "predicted:run")}, CONDITION)
    entry = _index(data)["cases"][0]
    assert not entry["has_mask"] and entry["mask_source"] is None and entry["mask_hash"] is None
    assert ds.labelled_indices() == [1, 2]  # the open dataset follows the disk
    assert targets == ["index.json", "mask.npy", "structure.npy"]  # withdrawn first
    monkeypatch.undo()
    ds.set_masks({case: (_box(ds), "predicted:run")}, CONDITION)  # a rerun completes it
    assert PreparedDataset(data).entry(case)["has_mask"]


def test_set_masks_checks_every_mask_before_writing_anything(data):
    ds = PreparedDataset(data)
    before = (data / "index.json").read_bytes()
    good, bad = ds.case_ids[0], ds.case_ids[1]
    with pytest.raises(InputError, match=rf"case {bad} \(predicted:run\): mask shape \(2, 3, 4\) differs"):
        ds.set_masks(
            {good: (_box(ds), "predicted:run"), bad: (np.zeros((2, 3, 4), np.uint8), "predicted:run")},
            CONDITION,
        )
    with pytest.raises(InputError, match=r"mask holds id 99, but canonical ids run"):
        ds.set_masks({good: (np.full(tuple(ds.geometry.shape), 99), "x")}, CONDITION)
    with pytest.raises(InputError, match=r"no case 'nope' \(cases: phantom_0_0000"):
        ds.set_masks({"nope": (_box(ds), "x")}, CONDITION)
    assert (data / "index.json").read_bytes() == before
    assert not np.array_equal(np.load(data / "cases" / good / "mask.npy"), _box(ds))
    assert ds.set_masks({}, CONDITION) == []


def test_set_masks_refuses_an_index_changed_since_opening(data):
    ds = PreparedDataset(data)
    _unlabel(data, 2)  # another writer
    with pytest.raises(InputError, match=r"index.json: changed on disk since this dataset was opened"):
        ds.set_masks({ds.case_ids[0]: (_box(ds), "x")}, CONDITION)
    assert not _index(data)["cases"][2]["has_mask"]


# ---------------------------------------------------------------------------------------- content_hash


def test_content_hash_ignores_paths_order_and_formatting(data, tmp_path):
    digest = PreparedDataset(data).content_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0
    index = _index(data)
    index["cases"].reverse()
    for entry in index["cases"]:
        entry["image_source"] = "/elsewhere/" + entry["id"]
        entry["mask_source"] = "external:/moved"
    index["preset"] = "tiny"
    (data / "index.json").write_text(json.dumps(index, indent=None))
    assert PreparedDataset(data).content_hash() == digest
    moved = shutil.move(data, tmp_path / "moved")
    assert PreparedDataset(moved).content_hash() == digest
    # An index written before mask_hash existed: the hash reads the arrays and agrees.
    for entry in index["cases"]:
        del entry["mask_hash"]
    (Path(moved) / "index.json").write_text(json.dumps(index))
    assert PreparedDataset(moved).content_hash() == digest


def test_content_hash_follows_cases_masks_sources_and_geometry(data):
    ds = PreparedDataset(data)
    digest, images = ds.content_hash(), ds.content_hash(masks=False)
    assert images != digest
    same = ds[0]["mask"].copy()
    ds.set_masks({ds.case_ids[0]: (same, "predicted:another/run")}, CONDITION)
    assert ds.content_hash() == digest  # the same values again, from elsewhere
    seen = {digest}
    original = (data / "index.json").read_text()

    def changed(edit) -> None:
        index = json.loads(original)
        edit(index)
        (data / "index.json").write_text(json.dumps(index))
        value = PreparedDataset(data).content_hash()
        assert value not in seen, edit
        seen.add(value)
        (data / "index.json").write_text(original)

    changed(lambda i: i["cases"].pop())
    changed(lambda i: i["cases"][1].update(content_hash="0" * 64))
    changed(lambda i: i["cases"][1].update(id="renamed"))
    changed(lambda i: i["geometry"].update(hu_window=[-900, 400]))
    changed(lambda i: i["cases"][2].update(has_mask=False))
    ds = PreparedDataset(data)
    ds.set_masks({ds.case_ids[1]: (_box(ds), "predicted:run")}, CONDITION)
    assert ds.content_hash() not in seen
    # The images' identity ignores masks (the VQ-GAN records it; masks are predicted after phase 1) ...
    assert ds.content_hash(masks=False) == images
    _unlabel(data, 0)
    assert PreparedDataset(data).content_hash(masks=False) == images
    # ... and follows the cases and their sources.
    index = _index(data)
    index["cases"][1]["content_hash"] = "1" * 64
    (data / "index.json").write_text(json.dumps(index))
    assert PreparedDataset(data).content_hash(masks=False) != images
