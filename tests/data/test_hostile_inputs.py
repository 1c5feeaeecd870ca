"""Hostile and unlucky inputs of ``prepare`` and prepared datasets (issue 15, items 1, 2, 4, 5, 8): each is
one line on the command line, exit code 2, and nothing written or deleted outside what lad-fast owns."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lad_fast.cli.app import main
from lad_fast.config import get_preset
from lad_fast.data.checks import MAX_VOXELS, refuse_label_map
from lad_fast.data.labels import FILE_WORDING, MASK_WORDING, integer_labels
from lad_fast.data.prepare import prepare_dataset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError, OutputExistsError

TINY = get_preset("tiny")
SHAPE = (40, 40, 12)
AFFINE = np.diag([6.4, 6.4, 4.6, 1.0])


def _case(root: Path, case_id: str = "c1", folder: str = "images", data: np.ndarray | None = None) -> Path:
    """A CT the tiny preset accepts (air around a soft-tissue body) as ``root/<folder>/<id>.nii.gz``."""
    if data is None:
        data = np.full(SHAPE, -1000.0, np.float32)
        data[5:35, 6:34] = 40.0 + np.random.default_rng(0).normal(0, 5, size=(30, 28, SHAPE[2]))
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def _cli(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("lad-fast: error: ") and err.count("\n") == 1, err
    return err


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def prepared(tmp_path) -> Path:
    _case(tmp_path / "src")
    out = tmp_path / "prep"
    prepare_dataset(tmp_path / "src", out, TINY)
    return out


# ------------------------------------------------------------------ 1. case ids in index.json are not paths


@pytest.mark.parametrize("bad", ["../../victim", "/abs/victim", "", "..", "a/b", "a\\b"])
def test_a_case_id_that_is_a_path_is_refused_on_read(prepared, tmp_path, capsys, bad):
    index = json.loads((prepared / "index.json").read_text())
    index["cases"][0]["id"] = bad
    (prepared / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=re.escape(f"index.json: case id {bad!r} is not a plain file name")):
        PreparedDataset(prepared)
    (tmp_path / "masks").mkdir()
    before = _tree(tmp_path)
    err = _cli(capsys, "import-masks", str(prepared), str(tmp_path / "masks"))
    assert f"case id {bad!r} is not a plain file name" in err and "re-prepare the dataset" in err
    err = _cli(
        capsys, "train", "vqgan", "--data", str(prepared), "--run", str(tmp_path / "run"), "--steps", "1"
    )
    assert f"case id {bad!r} is not a plain file name" in err
    assert _tree(tmp_path) == before  # nothing created anywhere: no victim/, no run folder


def test_a_case_folder_linked_outside_the_dataset_is_not_written_through(prepared, tmp_path):
    ds = PreparedDataset(prepared)
    elsewhere = tmp_path / "elsewhere"
    (prepared / "cases" / "c1").rename(elsewhere)
    (prepared / "cases" / "c1").symlink_to(elsewhere)
    with pytest.raises(
        InputError, match=r"cases/c1: resolves to .*elsewhere, outside .*prep; lad-fast reads"
    ):
        ds.set_masks({"c1": (np.zeros(TINY.geometry.shape, np.uint8), "external:x")}, TINY.condition)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["image.npy"]


# ---------------------------------------------------------------- 4. empty case id and a source named sub/..


def test_an_empty_nnunet_case_id_is_refused_and_nothing_is_replaced(prepared, tmp_path, capsys):
    src = tmp_path / "nnunet"
    _case(src, "_0000", folder="imagesTr")
    before = _tree(prepared)
    err = _cli(capsys, "prepare", str(src), str(prepared), "--preset", "tiny", "--force")
    assert f"{src / 'imagesTr' / '_0000.nii.gz'}: case id '' is not a plain file name" in err
    assert "rename it so that it has a name of its own" in err
    assert _tree(prepared) == before


def test_a_source_named_sub_dotdot_is_a_clear_error(tmp_path, capsys):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32) - 1000, AFFINE), str(tmp_path / "ct.nii.gz"))
    (tmp_path / "sub").mkdir()
    err = _cli(capsys, "prepare", str(tmp_path / "sub" / ".."), str(tmp_path / "out"), "--preset", "tiny")
    assert "case id '..' is not a plain file name" in err and "not one ending in '..'" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 2. prepare keeps what it did not write


def test_prepare_never_replaces_a_case_folder_holding_a_users_file(prepared, tmp_path, capsys):
    report = prepared / "cases" / "c1" / "report.txt"
    report.write_text("radiologist's notes")
    (prepared / "cases" / "c1" / "image.npy").unlink()  # so the case would be prepared again
    for force in ((), ("--force",)):
        err = _cli(capsys, "prepare", str(tmp_path / "src"), str(prepared), "--preset", "tiny", *force)
        assert f"{prepared / 'cases' / 'c1'}: holds report.txt, which prepare did not write" in err
        assert "--force never deletes files lad-fast did not write" in err
    assert report.read_text() == "radiologist's notes"
    with pytest.raises(OutputExistsError, match="holds report.txt"):
        prepare_dataset(tmp_path / "src", prepared, TINY, force=True)


# ------------------------------------------------------------------ 5. headers that claim too much


def _header_only(path: Path, shape: tuple[int, ...], compress: bool) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_qform(AFFINE, code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 64  # the extension flag and a few voxels
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize(
    ("shape", "compress", "message"),
    [
        (
            (4000, 4000, 4000),
            True,
            r"would be \(4000, 4000, 4000\) = 6\.4e\+10 voxels, more than lad-fast reads",
        ),
        (
            (1000, 1000, 1000),
            True,
            r"claims \(1000, 1000, 1000\) voxels \(2e\+09 bytes\), but the \d+-byte file",
        ),
        ((200, 200, 100), False, r"cannot hold them after its 352-byte header; the file is truncated"),
    ],
)
def test_a_header_claiming_more_than_the_file_holds_is_refused_before_reading(
    tmp_path, capsys, shape, compress, message
):
    name = "ct.nii.gz" if compress else "ct.nii"
    path = _header_only(tmp_path / "src" / "images" / name, shape, compress)
    if compress:
        assert path.stat().st_size < 200  # the 77-byte file, give or take the gzip header
    err = _cli(capsys, "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "tiny")
    assert str(path) in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_an_absurd_voxel_spacing_is_refused_before_resampling(tmp_path, capsys):
    path = tmp_path / "src" / "big.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16) - 1000, np.diag([1000.0] * 3 + [1.0])), path)
    err = _cli(capsys, "prepare", str(path), str(tmp_path / "out"), "--preset", "tiny")
    assert f"{path}: the volume resampled would be" in err and "voxels, more than lad-fast reads" in err
    from lad_fast.data.geometry import resample

    with pytest.raises(
        InputError, match=r"a \(10, 10, 10\) volume of \(1000\.0, 1000\.0, 1000\.0\) mm voxels"
    ):
        resample(np.zeros((10, 10, 10), np.float32), np.diag([1000.0] * 3 + [1.0]), (1.5, 1.5, 1.5), 1)
    assert MAX_VOXELS == 1 << 30


# ------------------------------------------------------------------ 8. label maps given as CT


def test_a_label_map_given_as_ct_is_refused(tmp_path, capsys):
    seg = np.zeros(SHAPE, np.uint8)
    seg[10:20, 10:20, 2:8] = 5
    seg[22:30, 12:18, 3:9] = 7
    _case(tmp_path / "src", "seg", data=seg)
    err = _cli(capsys, "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "tiny")
    assert "seg.nii.gz: looks like a label map, not a CT image (3 distinct whole values 0..7" in err
    assert "pass the CT scan as the image and this file as its mask" in err and "--label-map" in err
    assert not (tmp_path / "out").exists()
    # TotalSegmentator's binary organ masks, and a CT stored raw (air 0, no intercept), are told apart
    with pytest.raises(InputError, match=r"\(2 distinct whole values 0\.\.1,"):
        refuse_label_map((seg > 0).astype(np.float32), "liver.nii.gz")
    raw_ct = np.random.default_rng(0).integers(0, 2000, size=SHAPE).astype(np.float32)
    refuse_label_map(raw_ct, "raw.nii.gz")  # hundreds of values: a CT
    refuse_label_map(np.full(SHAPE, -1000.0, np.float32), "air.nii.gz")  # air: a CT


# ------------------------------------------------------------------ one integer-label checker, two wordings


@pytest.mark.parametrize(
    ("data", "mask_words", "file_words"),
    [
        (np.full(4, np.nan), "mask holds NaN or Inf", "label map holds NaN or Inf"),
        (np.full(4, 1.5), "float mask holds non-integer values", "label map holds non-integer values"),
        (
            np.full(4, -2, np.int16),
            r"mask holds negative labels \(min -2\)",
            r"label map holds negative values \(min -2\)",
        ),
        (np.full(4, "a"), "mask dtype <U1 is not numeric", "label voxel type <U1 is not numeric"),
    ],
)
def test_one_integer_label_checker_keeps_both_wordings(data, mask_words, file_words):
    with pytest.raises(InputError, match=f"^m: {mask_words}"):
        integer_labels(data, "m", MASK_WORDING)
    with pytest.raises(InputError, match=f"^f.nii: {file_words}"):
        integer_labels(data, "f.nii", FILE_WORDING)
    assert integer_labels(np.array([0, 300.0]), "x").dtype == np.uint16


def test_case_folders_follow_the_umask(prepared):
    mode = os.stat(prepared / "cases" / "c1").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    assert os.stat(prepared / "cases" / "c1" / "image.npy").st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_while_preparing_names_the_case_folder(tmp_path, capsys, monkeypatch):
    import errno

    _case(tmp_path / "src")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    err = _cli(capsys, "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "tiny")
    case = tmp_path / "out" / "cases" / "c1"
    assert err.startswith(f"lad-fast: error: {case}: no space left on the device")
    assert "free there); free some space and rerun the same command" in err
    assert not (tmp_path / "out").exists()


def test_a_dicom_series_beyond_the_voxel_cap_is_refused_before_allocating(shared, monkeypatch):
    pytest.importorskip("pydicom")
    import lad_fast.data.checks as checks
    from lad_fast.data.io import read_image

    monkeypatch.setattr(checks, "MAX_VOXELS", 1000)
    with pytest.raises(InputError, match=r"dicom: the DICOM series would be \(\d+, \d+, \d+\) = .* more"):
        read_image(shared / "totalseg_example" / "dicom")


def test_prepare_never_writes_over_an_index_json_it_did_not_write(tmp_path, capsys):
    _case(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text('{"my": "catalogue"}')
    for force in ((), ("--force",)):
        err = _cli(capsys, "prepare", str(tmp_path / "src"), str(out), "--preset", "tiny", *force)
        assert f"{out / 'index.json'}: not an index prepare wrote; move it out of the folder" in err
    assert (out / "index.json").read_text() == '{"my": "catalogue"}'
    assert sorted(os.listdir(out)) == ["index.json"]
