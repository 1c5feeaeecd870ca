"""A prepared dataset is verified when a job opens it (lad_fast/data/integrity.py): damaged arrays and a
damaged ``index.json`` are refused in one line naming the case and the command that re-prepares it, and
that command (a rerun of ``prepare``) re-prepares exactly the damaged cases, never copying one forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import lad_fast.data.integrity as integrity
from lad_fast.cli.app import main
from lad_fast.config import get_preset
from lad_fast.data.digest import image_hash
from lad_fast.data.prepare import prepare_dataset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.organs import NUM_CLASSES
from lad_fast.train.data import training_dataset

TINY = get_preset("tiny")


@pytest.fixture
def data(tiny_phantoms, tmp_path) -> Path:
    """A writable copy of the three tiny phantoms, prepared by this lad-fast (it records its source)."""
    out = tmp_path / "data"
    shutil.copytree(tiny_phantoms, out)
    return out


def _source(data: Path) -> Path:
    return Path(json.loads((data / "index.json").read_text())["source"])


def _fix(data: Path) -> str:
    return f"`lad-fast prepare {_source(data)} {data} --preset tiny`"


def _cli(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("lad-fast: error: ") and err.count("\n") == 1, err
    return err


def _edit_array(data: Path, case: str, name: str, edit) -> None:
    path = data / "cases" / case / name
    array = np.load(path)
    edit(array)
    np.save(path, array)


def _edit_index(data: Path, edit) -> None:
    index = json.loads((data / "index.json").read_text())
    edit(index)
    (data / "index.json").write_text(json.dumps(index))


def _train_refuses(capsys, data: Path, tmp_path: Path) -> str:
    """``train vqgan`` on ``data``: one line, exit 2, and no run folder."""
    run = tmp_path / "run"
    err = _cli(
        capsys, "train", "vqgan", "--data", str(data), "--run", str(run), "--steps", "1", "--device", "cpu"
    )
    assert not run.exists()
    return err


# ------------------------------------------------------------------------------------- arrays on read


def test_an_intact_dataset_verifies_and_each_case_is_read_once(data, monkeypatch):
    calls = []
    real = integrity.case_problem
    monkeypatch.setattr("lad_fast.data.prepared.case_problem", lambda *a: calls.append(a[0].name) or real(*a))
    ds = training_dataset(data, TINY)  # the one door of every trainer
    assert sorted(calls) == sorted(ds.case_ids)
    training_dataset(ds, TINY)  # the pipeline hands the open dataset on: nothing is read again
    assert len(calls) == 3
    entries = json.loads((data / "index.json").read_text())["cases"]
    assert all(len(e["image_hash"]) == 64 for e in entries)


def test_a_changed_image_is_refused_with_the_case_and_the_command_that_repairs_it(data, tmp_path, capsys):
    ds = PreparedDataset(data)
    case = ds.case_ids[1]
    before = (data / "cases" / case / "image.npy").read_bytes()
    _edit_array(
        data, case, "image.npy", lambda a: a.__setitem__((3, 30, 30), a[3, 30, 30] + np.float16(0.25))
    )
    with pytest.raises(InputError) as exc:
        PreparedDataset(data).verify()
    assert str(exc.value) == (
        f"{data}: case {case!r} is damaged: image.npy differs from the array prepare wrote (its hash does "
        f"not match the index); re-prepare it with {_fix(data)} (which skips the intact cases)"
    )
    assert f"case {case!r} is damaged: image.npy differs" in _train_refuses(capsys, data, tmp_path)
    # The command the message names re-prepares that case alone, back to the bytes prepare wrote.
    others = {c: (data / "cases" / c / "image.npy").stat().st_ino for c in ds.case_ids if c != case}
    prepare_dataset(_source(data), data, TINY)
    assert (data / "cases" / case / "image.npy").read_bytes() == before
    assert {c: (data / "cases" / c / "image.npy").stat().st_ino for c in others} == others
    PreparedDataset(data).verify()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_voxel_is_refused_at_load(data, tmp_path, capsys, value):
    case = PreparedDataset(data).case_ids[0]
    _edit_array(data, case, "image.npy", lambda a: a.__setitem__((0, 0, 0), value))
    _edit_index(data, lambda i: i["cases"][0].pop("image_hash"))  # even without a hash to compare
    err = _train_refuses(capsys, data, tmp_path)
    assert (
        f"case {case!r} is damaged: image.npy holds 1 NaN or Inf voxel; re-prepare it with {_fix(data)}"
        in err
    )


def test_a_non_finite_voxel_is_refused_at_prepare(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src" / "images"
    src.mkdir(parents=True)
    ct = np.full((40, 40, 12), -1000.0, np.float32)
    ct[5:35, 6:34] = 40.0
    ct[20, 20, 6] = np.nan
    nib.save(nib.Nifti1Image(ct, np.diag([6.4, 6.4, 4.6, 1.0])), str(src / "c1.nii.gz"))
    err = _cli(capsys, "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "tiny")
    assert "c1.nii.gz: 1 voxels are NaN or Inf; fill them" in err
    assert not (tmp_path / "out").exists()
    # And whatever path leads there, a non-finite prepared image is never written.
    ct[20, 20, 6] = 40.0
    nib.save(nib.Nifti1Image(ct, np.diag([6.4, 6.4, 4.6, 1.0])), str(src / "c1.nii.gz"))
    import lad_fast.data.geometry as geometry

    real = geometry.prepare_case

    def poisoned(*args, **kwargs):
        case = real(*args, **kwargs)
        case.image[0, 0, :2] = np.inf
        return case

    monkeypatch.setattr(geometry, "prepare_case", poisoned)
    err = _cli(capsys, "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "tiny")
    assert "c1.nii.gz: 2 prepared voxels are NaN or Inf; fill them in the source" in err
    assert not (tmp_path / "out").exists()


def test_a_mask_with_an_id_outside_the_organs_is_refused(data, tmp_path, capsys):
    case = PreparedDataset(data).case_ids[2]
    _edit_array(data, case, "mask.npy", lambda a: a.__setitem__((1, 2, 3), 200))
    err = _train_refuses(capsys, data, tmp_path)
    assert (
        f"case {case!r} is damaged: mask.npy holds id 200, but canonical organ ids run 0..{NUM_CLASSES - 1}"
        in err
    )
    _edit_index(data, lambda i: i["cases"][2].update(mask_hash=None))  # no hash to compare: still refused
    assert "mask.npy holds id 200" in _train_refuses(capsys, data, tmp_path)


def test_generate_refuses_to_condition_on_a_damaged_mask(data):
    from lad_fast.generate.jobs import load_source_masks

    case = PreparedDataset(data).case_ids[1]
    assert len(load_source_masks(data, "tiny", TINY.geometry.shape)) == 3
    _edit_array(data, case, "mask.npy", lambda a: a.__setitem__((1, 2, 3), 200))
    with pytest.raises(InputError) as exc:
        load_source_masks(data, "tiny", TINY.geometry.shape)
    assert f"case {case!r} is damaged: mask.npy holds id 200" in str(exc.value)
    assert f"re-prepare it with {_fix(data)}" in str(exc.value)


def test_a_changed_mask_is_refused(data):
    case = PreparedDataset(data).case_ids[0]
    _edit_array(data, case, "mask.npy", lambda a: a.__setitem__((1, 2, 3), (a[1, 2, 3] + 1) % NUM_CLASSES))
    with pytest.raises(InputError, match=r"mask.npy or structure.npy differs from what was written"):
        PreparedDataset(data).verify()


def test_a_mask_of_the_wrong_shape_is_one_line_for_every_reader(data, tmp_path, capsys):
    case = PreparedDataset(data).case_ids[0]
    np.save(data / "cases" / case / "mask.npy", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(
        InputError, match=r"mask.npy has shape \(4, 5, 6\), not the geometry's \(16, 64, 64\)"
    ):
        PreparedDataset(data)[0]  # a reader that skips verify (preview, evaluate) still gets one line
    err = _train_refuses(capsys, data, tmp_path)
    assert "mask.npy is a uint8 array of shape (4, 5, 6), not uint8 (16, 64, 64)" in err


def test_a_case_whose_mask_came_later_says_to_give_it_again(data):
    ds = PreparedDataset(data)
    ds.set_masks({ds.case_ids[0]: (np.asarray(ds[0]["mask"]), "predicted:runs/seg")}, TINY.condition)
    _edit_array(data, ds.case_ids[0], "image.npy", lambda a: a.__setitem__((0, 0, 0), np.nan))
    with pytest.raises(InputError, match=r"then give it its mask again \(it came from predicted:runs/seg\)$"):
        PreparedDataset(data).verify()


# --------------------------------------------------------------------------------- index.json damaged


def _drop(key):
    return lambda i: i.pop(key)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_drop("geometry"), "damaged, its 'geometry' is missing; re-prepare the dataset"),
        (_drop("cases"), "damaged, its 'cases' is missing"),
        (_drop("preset"), "damaged, its 'preset' is missing"),
        (lambda i: i.update(cases={"a": 1}), "damaged, its 'cases' is not a list"),
        (
            lambda i: i["geometry"].update(shape=[16, 64]),
            "its 'geometry' is not a geometry (GeometryConfig.shape",
        ),
        (
            lambda i: i["geometry"].update(shape=[16, 0, 64]),
            "its 'geometry' has an impossible shape or spacing",
        ),
        (lambda i: i.update(organs=["liver"]), "prepared with another organ list (1 organs"),
        (lambda i: i["cases"][1].pop("has_mask"), "(entry 1) has no 'has_mask' (true or false)"),
        (lambda i: i["cases"][0].update(affine=[[1, 2]]), "(entry 0) has no finite 4 x 4 'affine'"),
        (lambda i: i["cases"][0].update(image_hash="abc"), "(entry 0) has a malformed 'image_hash' 'abc'"),
        (lambda i: i["cases"][2].pop("content_hash"), "(entry 2) has no 'content_hash'"),
        (lambda i: i["cases"].append(7), "case id None is not a plain file name"),
    ],
)
def test_a_damaged_index_is_one_line_naming_it(data, tmp_path, capsys, edit, words):
    _edit_index(data, edit)
    err = _train_refuses(capsys, data, tmp_path)
    assert f"{data / 'index.json'}: " in err and words in err, err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (
            b'{"schema_version": 1, "cases": [\xff]}',
            "damaged, byte 32 is not UTF-8 text (invalid start byte)",
        ),
        (b'{"schema_version": 1, "cases": [', "damaged, not valid JSON (Expecting value"),
        (b"[1, 2]", "damaged, holds a JSON list, not an object; move it out of the folder and re-prepare"),
    ],
)
def test_an_index_of_bad_bytes_or_bad_json_is_one_line(data, tmp_path, capsys, content, words):
    (data / "index.json").write_bytes(content)
    err = _train_refuses(capsys, data, tmp_path)
    assert f"{data / 'index.json'}: {words}" in err, err
    assert "`lad-fast prepare SRC " in err  # the index that recorded the source is unreadable


def test_a_rerun_of_prepare_never_copies_a_damaged_entry_forward(data, capsys):
    _edit_index(data, lambda i: i["cases"][1].pop("has_mask"))
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(_source(data)), str(data), "--preset", "tiny"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    index = json.loads((data / "index.json").read_text())
    assert [e["has_mask"] for e in index["cases"]] == [True, True, True]
    PreparedDataset(data).verify()


def test_a_rerun_of_prepare_repairs_an_index_without_geometry(data):
    _edit_index(data, _drop("geometry"))
    prepare_dataset(_source(data), data, TINY)  # no --force needed: it is this preset's own index
    ds = PreparedDataset(data)
    ds.verify()
    assert tuple(ds.geometry.shape) == TINY.geometry.shape


def test_an_index_written_before_image_hash_is_verified_and_upgraded_in_place(data):
    _edit_index(data, lambda i: [e.pop("image_hash") for e in i["cases"]])
    PreparedDataset(data).verify()  # no hash to compare: shape, dtype and finiteness are still checked
    inodes = [p.stat().st_ino for p in sorted(data.glob("cases/*/image.npy"))]
    prepare_dataset(_source(data), data, TINY)
    assert [p.stat().st_ino for p in sorted(data.glob("cases/*/image.npy"))] == inodes  # nothing re-prepared
    entries = json.loads((data / "index.json").read_text())["cases"]
    assert [e["image_hash"] for e in entries] == [
        image_hash(np.load(data / "cases" / e["id"] / "image.npy")) for e in entries
    ]
