"""Layout discovery on tiny synthetic trees (8x8x4 volumes) and on the shared sample case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lad_fast.data.io import read_labels
from lad_fast.data.layouts import LAYOUTS, CaseSource, discover
from lad_fast.errors import ConfigError, InputError


def _nii(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), dtype=np.int16), np.eye(4)), str(path))
    return path


def _summary(cases: list[CaseSource], root: Path) -> list[tuple]:
    def rel(p: Path | None) -> str | None:
        return None if p is None else p.relative_to(root).as_posix()

    return [(c.case_id, rel(c.image), rel(c.mask), c.vocabulary, c.label_map) for c in cases]


def test_abdomenct1k(tmp_path: Path) -> None:
    for i in (2, 1, 3):
        _nii(tmp_path / "Image" / f"part{i % 2}" / f"Case_0000{i}_0000.nii.gz")
    _nii(tmp_path / "Mask" / "Case_00001.nii.gz")
    _nii(tmp_path / "Mask" / "Case_00002.nii.gz")
    _nii(tmp_path / "Image" / ".Case_00009_0000.nii.gz.tmp.nii.gz")  # a writer's temporary: ignored
    layout, cases = discover(tmp_path)
    assert layout == "abdomenct1k"
    assert _summary(cases, tmp_path) == [
        ("Case_00001", "Image/part1/Case_00001_0000.nii.gz", "Mask/Case_00001.nii.gz", "abdomenct1k", None),
        ("Case_00002", "Image/part0/Case_00002_0000.nii.gz", "Mask/Case_00002.nii.gz", "abdomenct1k", None),
        ("Case_00003", "Image/part1/Case_00003_0000.nii.gz", None, "abdomenct1k", None),
    ]


def test_totalseg_dataset(tmp_path: Path) -> None:
    _nii(tmp_path / "s0002" / "ct.nii.gz")
    _nii(tmp_path / "s0002" / "segmentations" / "liver.nii.gz")
    _nii(tmp_path / "s0001" / "ct.nii.gz")
    _nii(tmp_path / "s0001" / "seg.nii.gz")
    (tmp_path / "meta.csv").write_text("image_id\n")
    layout, cases = discover(tmp_path)
    assert layout == "totalseg"
    assert _summary(cases, tmp_path) == [
        ("s0001", "s0001/ct.nii.gz", "s0001/seg.nii.gz", "totalseg", None),
        ("s0002", "s0002/ct.nii.gz", "s0002/segmentations", "totalseg", None),
    ]


def test_totalseg_single_case_from_shared(shared: Path) -> None:
    src = shared / "totalseg_example"
    layout, cases = discover(src)
    assert layout == "totalseg"
    assert cases == [CaseSource("totalseg_example", src / "ct.nii.gz", src / "seg.nii.gz", "totalseg")]
    # Its DICOM subfolder on its own is a one-case DICOM layout.
    assert discover(src / "dicom") == ("dicom", [CaseSource("dicom", src / "dicom", None, None)])


def test_nnunet_v2_and_v1_labels(tmp_path: Path) -> None:
    for case in ("abd_002", "abd_001"):
        _nii(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        _nii(tmp_path / "imagesTr" / f"{case}_0001.nii.gz")  # a second channel: not a case of its own
    _nii(tmp_path / "labelsTr" / "abd_001.nii.gz")
    labels_v2 = {"background": 0, "Liver": 1, "tumour": 2, "pancreas": 3}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels_v2}))
    layout, cases = discover(tmp_path)
    assert layout == "nnunet"
    expected_map = {1: "liver", 3: "pancreas"}
    assert _summary(cases, tmp_path) == [
        ("abd_001", "imagesTr/abd_001_0000.nii.gz", "labelsTr/abd_001.nii.gz", None, expected_map),
        ("abd_002", "imagesTr/abd_002_0000.nii.gz", None, None, expected_map),
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}}))
    assert discover(tmp_path)[1][0].label_map == {1: "spleen"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    assert discover(tmp_path)[1][0].label_map is None
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match=r"dataset\.json: not a readable nnU-Net dataset\.json"):
        discover(tmp_path)


def test_flat_with_masks_and_vocabulary(tmp_path: Path) -> None:
    for case in ("b", "a"):
        _nii(tmp_path / "images" / f"{case}.nii.gz")
    _nii(tmp_path / "masks" / "a.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"vocabulary": "totalseg"}))
    layout, cases = discover(tmp_path)
    assert layout == "flat"
    assert _summary(cases, tmp_path) == [
        ("a", "images/a.nii.gz", "masks/a.nii.gz", "totalseg", None),
        ("b", "images/b.nii.gz", None, "totalseg", None),
    ]
    (tmp_path / "labels.json").write_text(json.dumps({"map": {"1": "pancreas", "2": "kidney"}}))
    assert discover(tmp_path)[1][0].label_map == {1: "pancreas", 2: "kidney"}
    assert discover(tmp_path)[1][0].vocabulary is None


def test_flat_files_in_folder_and_single_file(tmp_path: Path) -> None:
    _nii(tmp_path / "x1.nii")
    _nii(tmp_path / "x2.nii.gz")
    layout, cases = discover(tmp_path)
    assert layout == "flat"
    assert _summary(cases, tmp_path) == [
        ("x1", "x1.nii", None, None, None),
        ("x2", "x2.nii.gz", None, None, None),
    ]
    assert discover(tmp_path / "x2.nii.gz") == (
        "file",
        [CaseSource("x2", tmp_path / "x2.nii.gz", None, None)],
    )


def test_phantom_output_round_trip(tmp_path: Path) -> None:
    """The phantom writer's layout: images/, masks/, labels.json = totalseg; masks readable."""
    for i in range(3):
        _nii(tmp_path / "images" / f"phantom_{i:03d}.nii.gz")
        _nii(tmp_path / "masks" / f"phantom_{i:03d}.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"vocabulary": "totalseg"}))
    layout, cases = discover(tmp_path, layout="flat")
    assert layout == "flat" and [c.case_id for c in cases] == ["phantom_000", "phantom_001", "phantom_002"]
    assert all(c.mask is not None and c.vocabulary == "totalseg" for c in cases)
    assert read_labels(cases[0].mask).shape == (8, 8, 4)


def test_dicom_folder(shared: Path, tmp_path: Path) -> None:
    series = tmp_path / "series_7"
    series.mkdir()
    for p in sorted((shared / "totalseg_example" / "dicom").iterdir())[:3]:
        shutil.copy(p, series / p.name)
    assert discover(series) == ("dicom", [CaseSource("series_7", series, None, None)])


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing: no such file or folder"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: folder is empty; expected CT volumes"):
        discover(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(
        InputError, match=r"junk: no dataset layout matches this folder; expected one of .*nnunet"
    ):
        discover(tmp_path / "junk")
    with pytest.raises(InputError, match=r"readme\.txt: unsupported file type"):
        discover(tmp_path / "junk" / "readme.txt")
    with pytest.raises(InputError, match=r"junk: does not look like the nnunet layout; expected imagesTr/"):
        discover(tmp_path / "junk", layout="nnunet")
    with pytest.raises(ConfigError, match=r"unknown layout 'msd'; choose auto or one of file, totalseg"):
        discover(tmp_path / "junk", layout="msd")
    assert set(LAYOUTS) == {"file", "totalseg", "nnunet", "abdomenct1k", "flat", "dicom"}


def test_bad_labels_json_and_duplicates(tmp_path: Path) -> None:
    _nii(tmp_path / "images" / "a.nii.gz")
    (tmp_path / "labels.json").write_text("{oops")
    with pytest.raises(InputError, match=r"labels\.json: not readable JSON"):
        discover(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"vocabulary": "msd"}))
    with pytest.raises(InputError, match=r"labels\.json: unknown vocabulary 'msd'; choose one of totalseg"):
        discover(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"map": {"1": "heart"}}))
    with pytest.raises(
        InputError, match=r"labels\.json: unknown organ 'heart' for id 1; valid names: background"
    ):
        discover(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"vocab": "totalseg"}))
    with pytest.raises(InputError, match=r'labels\.json: expected \{"vocabulary": "<name>"\}'):
        discover(tmp_path)
    (tmp_path / "labels.json").unlink()
    _nii(tmp_path / "images" / "a.nii")
    with pytest.raises(InputError, match=r"case ids \['a'\] occur more than once"):
        discover(tmp_path)
