from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lad_fast.conditioning.conditions import structure_condition
from lad_fast.config import get_preset
from lad_fast.data.labels import NUM_CLASSES, TOTALSEG_V2_NAMES
from lad_fast.data.masks import EmptyMaskWarning, import_masks, mask_source_kind, validate_mask
from lad_fast.data.prepare import prepare_dataset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError

ORGAN_FILES = {i: name for name, i in TOTALSEG_V2_NAMES.items()}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Raw phantoms (images/ and TotalSegmentator-id masks/), prepared with and without their masks."""
    from lad_fast.data.phantom.draw import write_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    cfg = get_preset("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_QUIET", "1")
        write_phantoms(root / "raw", n=2, cfg=cfg.phantom, seed=3)
        prepare_dataset(root / "raw", root / "labelled", cfg)
        shutil.copytree(root / "raw" / "images", root / "images_only")
        prepare_dataset(root / "images_only", root / "unlabelled", cfg)
    return root


@pytest.fixture
def unlabelled(phantoms, tmp_path) -> Path:
    return shutil.copytree(phantoms / "unlabelled", tmp_path / "data")


def _organ_folder(label_file: Path, out: Path) -> Path:
    """Split a TotalSegmentator-id label map into TotalSegmentator's folder output (<organ>.nii.gz)."""
    img = nib.load(str(label_file))
    labels = np.asarray(img.dataobj)
    out.mkdir(parents=True)
    for i in np.unique(labels):
        if i in ORGAN_FILES:
            nib.save(
                nib.Nifti1Image((labels == i).astype(np.uint8), img.affine),
                str(out / f"{ORGAN_FILES[i]}.nii.gz"),
            )
    return out


def _write_labels(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ------------------------------------------------------------------------------------------- validate


def test_validate_mask_accepts_integer_valued_masks():
    assert validate_mask(np.ones((2, 3, 4), np.int64), (2, 3, 4), "m").dtype == np.uint8
    out = validate_mask(np.full((2, 3, 4), 5.0), (2, 3, 4), "m")
    assert out.dtype == np.uint8 and (out == 5).all()
    assert validate_mask(np.zeros((2, 3, 4), bool), (2, 3, 4), "m").sum() == 0  # empty masks are valid


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((2, 3, 5), np.uint8), r"m: mask shape \(2, 3, 5\) differs from its image's \(2, 3, 4\)"),
        (np.full((2, 3, 4), 1.5), "m: float mask holds non-integer values"),
        (np.full((2, 3, 4), -1, np.int16), r"m: mask holds negative labels \(min -1\)"),
        (np.full((2, 3, 4), -2.0), r"m: mask holds negative labels \(min -2\)"),
        (np.full((2, 3, 4), np.nan), "m: mask holds NaN or Inf"),
        (np.full((2, 3, 4), NUM_CLASSES, np.uint8), f"canonical ids run 0..{NUM_CLASSES - 1}"),
        (np.full((2, 3, 4), "a"), "not numeric"),
    ],
)
def test_validate_mask_errors_name_the_problem(mask, message):
    with pytest.raises(InputError, match=message):
        validate_mask(mask, (2, 3, 4), "m")


def test_mask_source_kinds():
    assert mask_source_kind({"has_mask": False}) is None
    assert mask_source_kind({"has_mask": True, "mask_source": "/data/masks/a.nii.gz"}) == "dataset"
    assert mask_source_kind({"has_mask": True, "mask_source": "external:/x/a"}) == "external"
    assert mask_source_kind({"has_mask": True, "mask_source": "predicted:runs/a"}) == "predicted"


# --------------------------------------------------------------------------------------------- import


def test_imported_totalsegmentator_folders_equal_prepared_masks(phantoms, unlabelled, tmp_path):
    raw = phantoms / "raw" / "masks"
    ext = tmp_path / "totalseg"
    for f in sorted(raw.glob("*.nii.gz")):
        _organ_folder(f, ext / f.name.removesuffix(".nii.gz"))
    written = import_masks(unlabelled, ext)
    assert written == ["phantom_3_0000", "phantom_3_0001"]
    ours, ref = PreparedDataset(unlabelled), PreparedDataset(phantoms / "labelled")
    cfg = get_preset("tiny")
    for i, case in enumerate(ours.case_ids):
        entry = ours.entry(case)
        assert entry["has_mask"] and entry["mask_source"] == f"external:{ext / case}"
        assert mask_source_kind(entry) == "external" and entry["window"] == "later mask"
        mask = np.asarray(ours[i]["mask"])
        np.testing.assert_array_equal(ours[i]["structure"], structure_condition(mask, cfg.condition))
        # The slice window was chosen again from the imported mask: the case is what preparing image
        # and mask together makes of it.
        assert entry["crop"] == ref.entry(case)["crop"] and entry["affine"] == ref.entry(case)["affine"]
        for name in ("image", "mask", "structure"):
            np.testing.assert_array_equal(ours[i][name], ref[i][name])
        assert mask.any()
    # Cases that have a mask now are skipped, unless forced.
    assert import_masks(unlabelled, ext) == []
    assert len(import_masks(unlabelled, ext, force=True)) == 2


def test_import_label_files_in_another_vocabulary(phantoms, unlabelled, tmp_path):
    src = phantoms / "raw" / "masks" / "phantom_3_0000.nii.gz"
    img = nib.load(str(src))
    labels = np.asarray(img.dataobj)
    canonical = np.zeros_like(labels)
    canonical[labels == 5] = 1  # TotalSegmentator liver -> canonical liver
    canonical[labels == 7] = 5  # and pancreas
    _write_labels(tmp_path / "ext" / "phantom_3_0000.nii.gz", canonical, img.affine)
    assert import_masks(unlabelled, tmp_path / "ext", vocabulary="canonical") == ["phantom_3_0000"]
    mask = np.asarray(PreparedDataset(unlabelled)[0]["mask"])
    assert set(np.unique(mask)) == {0, 1, 5}
    assert not PreparedDataset(unlabelled).entry("phantom_3_0001")["has_mask"]  # no file: skipped


def test_import_refuses_a_mask_whose_shape_differs_from_its_image(phantoms, unlabelled, tmp_path):
    img = nib.load(str(phantoms / "raw" / "masks" / "phantom_3_0000.nii.gz"))
    _write_labels(tmp_path / "ext" / "phantom_3_0000.nii.gz", np.zeros((64, 64, 20), np.uint8), img.affine)
    with pytest.raises(
        InputError, match=r"mask shape \(64, 64, 20\) differs from its image's \(64, 64, 24\)"
    ):
        import_masks(unlabelled, tmp_path / "ext")


def test_import_refuses_a_mask_off_its_image_grid(phantoms, unlabelled, tmp_path):
    img = nib.load(str(phantoms / "raw" / "masks" / "phantom_3_0000.nii.gz"))
    moved = img.affine.copy()
    moved[:3, 3] += 10.0
    path = _write_labels(tmp_path / "ext" / "phantom_3_0000.nii.gz", np.asarray(img.dataobj), moved)
    with pytest.raises(InputError, match=f"{path}: affines differ by up to 10 mm.*not aligned"):
        import_masks(unlabelled, tmp_path / "ext")
    # A case whose window is already set crops the mask to it, and checks the grid there.
    labelled = shutil.copytree(phantoms / "labelled", tmp_path / "labelled")
    with pytest.raises(InputError, match=rf"{path}: mask grid is 10 mm away from its image's.*not aligned"):
        import_masks(labelled, tmp_path / "ext", force=True)


@pytest.mark.parametrize(
    ("value", "message"), [(1.5, "label map holds non-integer values"), (-1.0, "label map holds negative")]
)
def test_import_refuses_non_integer_and_negative_labels(phantoms, unlabelled, tmp_path, value, message):
    img = nib.load(str(phantoms / "raw" / "masks" / "phantom_3_0000.nii.gz"))
    bad = np.zeros(img.shape, np.float32)
    bad[10, 10, 10] = value
    path = _write_labels(tmp_path / "ext" / "phantom_3_0000.nii.gz", bad, img.affine)
    with pytest.raises(InputError, match=f"{path}: {message}"):
        import_masks(unlabelled, tmp_path / "ext")
    assert not PreparedDataset(unlabelled).entry("phantom_3_0000")["has_mask"]  # nothing written


def test_import_without_any_matching_mask_is_a_clear_error(unlabelled, tmp_path):
    (tmp_path / "ext").mkdir()
    with pytest.raises(InputError, match="no mask for any case.*phantom_3_0000"):
        import_masks(unlabelled, tmp_path / "ext")
    with pytest.raises(InputError, match="no such folder"):
        import_masks(unlabelled, tmp_path / "missing")


def test_import_leaves_index_consistent(phantoms, unlabelled, tmp_path):
    ext = tmp_path / "ts"
    _organ_folder(phantoms / "raw" / "masks" / "phantom_3_0001.nii.gz", ext / "phantom_3_0001")
    import_masks(unlabelled, ext)
    index = json.loads((unlabelled / "index.json").read_text())
    for entry in index["cases"]:
        folder = unlabelled / "cases" / entry["id"]
        assert (folder / "mask.npy").is_file() == entry["has_mask"]
    assert not any(p.name.startswith(".") for p in unlabelled.rglob("*"))  # no temporaries left


# ------------------------------------------------------------------------ masks without window organs


def _labels_without(phantoms: Path, tmp_path: Path, keep: tuple[int, ...]) -> Path:
    """phantom_3_0000's label map with only the TotalSegmentator ids ``keep`` (none: all zeros)."""
    img = nib.load(str(phantoms / "raw" / "masks" / "phantom_3_0000.nii.gz"))
    labels = np.asarray(img.dataobj)
    kept = np.where(np.isin(labels, keep), labels, 0).astype(np.uint8)
    return _write_labels(tmp_path / "ext" / "phantom_3_0000.nii.gz", kept, img.affine)


@pytest.mark.parametrize(
    ("keep", "problem"),
    [
        ((), r"mask is empty on the prepared grid \(no organ at all\)"),
        (
            (5, 1),
            r"mask holds none of the organs its slice window is chosen by \(pancreas, pancreatic_lesion\)",
        ),
    ],
)
def test_a_mask_without_window_organs_is_refused_or_warned_with_allow_empty(
    phantoms, unlabelled, tmp_path, keep, problem
):
    path = _labels_without(phantoms, tmp_path, keep)
    before = (unlabelled / "index.json").read_text()
    with pytest.raises(
        InputError, match=rf"case phantom_3_0000 \(external:{path}\): {problem}.*--allow-empty"
    ):
        import_masks(unlabelled, tmp_path / "ext")
    assert (unlabelled / "index.json").read_text() == before  # nothing written
    assert not (unlabelled / "cases" / "phantom_3_0000" / "mask.npy").exists()
    with pytest.warns(EmptyMaskWarning, match=rf"{problem}.*written anyway \(--allow-empty\)"):
        assert import_masks(unlabelled, tmp_path / "ext", allow_empty=True) == ["phantom_3_0000"]
    entry = PreparedDataset(unlabelled).entry("phantom_3_0000")
    assert (
        entry["has_mask"]
        and entry["crop"] == PreparedDataset(phantoms / "unlabelled").entry("phantom_3_0000")["crop"]
    )


def test_a_replacement_mask_without_window_organs_is_refused_too(phantoms, tmp_path):
    labelled = shutil.copytree(phantoms / "labelled", tmp_path / "labelled")
    _labels_without(phantoms, tmp_path, (5,))  # liver only
    with pytest.raises(InputError, match=r"mask holds none of the organs its slice window is chosen by"):
        import_masks(labelled, tmp_path / "ext", force=True)
    assert PreparedDataset(labelled).entry("phantom_3_0000")["mask_source"].endswith("phantom_3_0000.nii.gz")


def test_cli_import_masks_allow_empty_and_one_line_refusal(phantoms, unlabelled, tmp_path, capsys):
    from lad_fast.cli.app import main

    _labels_without(phantoms, tmp_path, ())
    with pytest.raises(SystemExit) as exc:
        main(["import-masks", str(unlabelled), str(tmp_path / "ext")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "mask is empty on the prepared grid" in err
    with pytest.raises(SystemExit) as exc, pytest.warns(EmptyMaskWarning):
        main(["import-masks", str(unlabelled), str(tmp_path / "ext"), "--allow-empty"])
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out == f"imported masks for 1 case into {unlabelled}\n"
