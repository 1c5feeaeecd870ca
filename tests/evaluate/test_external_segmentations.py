"""``lad-fast evaluate --segmentations``: mask fidelity from an external segmenter's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# The small real set and the CLI helpers of the evaluate command tests (tests/ is on sys.path).
from evaluate import test_evaluate_cmd as cmd_tests
from evaluate.test_evaluate_cmd import N_REAL, _assert_refused, run_cli, write_synthetic

real, seg_run = cmd_tests.real, cmd_tests.seg_run  # fixtures, requested by name below


@pytest.fixture(scope="module")
def generated(real, tmp_path_factory) -> Path:
    """Three 'generated' volumes whose manifest names no run: nothing can load a lad-fast segmenter."""
    return write_synthetic(tmp_path_factory.mktemp("gen") / "generated", real, None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random MedicalNet ResNet-10 weights in the official key layout."""
    from lad_fast.evaluate.nets.medicalnet import MedicalNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("medicalnet") / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in MedicalNet(10).state_dict().items()}}, path)
    return path


def copy_masks(generated: Path, out: Path) -> Path:
    """External 'segmentations' equal to the conditioning masks (canonical label files)."""
    shutil.copytree(generated / "masks", out)
    return out


def organ_folders(labels: dict[str, Path], out: Path) -> Path:
    """TotalSegmentator's folder layout: ``out/<id>/<organ>.nii.gz`` binary masks from label files in
    TotalSegmentator ids."""
    import nibabel as nib

    from lad_fast.data.labels import TOTALSEG_V2_NAMES

    for vid, path in labels.items():
        img = nib.load(str(path))
        ids = np.asarray(img.dataobj)
        for name, tid in TOTALSEG_V2_NAMES.items():
            if (ids == tid).any():
                (out / vid).mkdir(parents=True, exist_ok=True)
                mask = (ids == tid).astype(np.uint8)
                nib.save(nib.Nifti1Image(mask, img.affine), str(out / vid / f"{name}.nii.gz"))
    return out


def test_segmentations_equal_to_the_conditioning_masks_score_dice_one(generated, tmp_path):
    from lad_fast.evaluate.report import synthetic_fidelity

    segs = copy_masks(generated, tmp_path / "segs")
    rep = synthetic_fidelity(generated, segmentations=segs, device="cpu")
    assert rep["synthetic"]["mean_dice"] == 1.0 and rep["synthetic"]["structure_l1"] == 0.0
    assert rep["synthetic"]["mean_volume_error"] == 0.0
    assert rep["shuffled"]["mean_dice"] < 0.99 and rep["shuffled"]["structure_l1"] > 0
    assert rep["segmenter"] is None
    assert rep["segmentations"] == {"source": str(segs), "vocabulary": "auto", "strict": False}


def test_totalsegmentator_organ_folders_are_read_and_mapped(generated, tmp_path):
    """Organ folders (spleen.nii.gz, liver.nii.gz, ...) of the conditioning masks, written in another
    voxel order than the volumes: the organs TotalSegmentator knows score Dice 1."""
    import nibabel as nib

    from lad_fast.data.labels import CANONICAL_ID
    from lad_fast.evaluate.report import synthetic_fidelity

    canonical_to_totalseg = {CANONICAL_ID["liver"]: 5, CANONICAL_ID["spleen"]: 1, CANONICAL_ID["pancreas"]: 7}
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for f in (generated / "masks").iterdir():  # flip the first voxel axis (the affine follows)
        img = nib.load(str(f))
        data = np.asarray(img.dataobj)[::-1]
        aff = img.affine.copy()
        aff[:3, 3] += aff[:3, 0] * (data.shape[0] - 1)
        aff[:3, 0] *= -1
        tid = np.zeros_like(data)
        for c, t in canonical_to_totalseg.items():
            tid[data == c] = t
        nib.save(nib.Nifti1Image(tid, aff), str(flipped / f.name))
    labels = {f.name.removesuffix(".nii.gz"): f for f in flipped.iterdir()}
    segs = organ_folders(labels, tmp_path / "totalseg")
    assert sorted(p.name for p in (segs / "lad_000000").iterdir()) == [
        "liver.nii.gz",
        "pancreas.nii.gz",
        "spleen.nii.gz",
    ]
    rep = synthetic_fidelity(generated, segmentations=segs, device="cpu")
    dice = rep["synthetic"]["dice"]
    assert dice["liver"] == 1.0 and dice["spleen"] == 1.0 and dice["pancreas"] == 1.0
    assert dice["kidney_right"] == 0.0  # present in the condition, absent from these segmentations
    # an organ folder is TotalSegmentator's: another vocabulary for it is refused
    from lad_fast.errors import InputError

    with pytest.raises(InputError, match=r"organ folder holds TotalSegmentator masks.*vocabulary is lad"):
        synthetic_fidelity(generated, segmentations=segs, segmentation_vocabulary="lad", device="cpu")


def _args(real: Path, generated: Path, weights: Path, segs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--real", str(real), "--synthetic", str(generated), "--features", "medicalnet", "--weights",
        str(weights), "--segmentations", str(segs), "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def test_medicalnet_with_segmentations_needs_no_segmenter_and_skips_the_real_ceiling(
    real,
    generated,
    weights,
    tmp_path,
    capsys,
):
    segs = copy_masks(generated, tmp_path / "segs")
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    code, stdout, err = run_cli(_args(real, generated, weights, segs, out, "--png", str(png)), capsys)
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert rep["segmenter"] is None and rep["features"]["extractor"] == "medicalnet-resnet10"
    assert rep["segmentations"] == {
        "source": str(segs), "vocabulary": "auto", "strict": False, "real_source": None,
    }  # fmt: skip
    fid = rep["fidelity"]
    assert fid["synthetic"]["mean_dice"] == 1.0 and fid["shuffled"]["mean_dice"] < 0.99
    assert "--real-segmentations" in fid["real"]["skipped"] and "dice" not in fid["real"]
    assert "not available" in stdout and png.is_file()
    assert rep["intensity"]["real_masks"] == "labels"


def test_real_segmentations_give_the_real_ceiling(real, generated, weights, tmp_path, capsys):
    """The real ceiling from TotalSegmentator organ folders of the real cases' source label maps (on
    the source images' grid, as TotalSegmentator writes them): they are the labels, so Dice 1."""
    from lad_fast.data.prepared import PreparedDataset

    ds = PreparedDataset(real)
    sources = {i: Path(ds.entry(i)["mask_source"]) for i in ds.case_ids}
    real_segs = organ_folders(sources, tmp_path / "real_segs")
    segs = copy_masks(generated, tmp_path / "segs")
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        _args(real, generated, weights, segs, out, "--real-segmentations", str(real_segs)), capsys
    )
    assert code == 0, err
    rep = json.loads(out.read_text())
    ceiling = rep["fidelity"]["real"]
    assert ceiling["cases"] == N_REAL and ceiling["dice"]["liver"] == 1.0 and ceiling["dice"]["spleen"] == 1.0
    assert rep["segmentations"]["real_source"] == str(real_segs)


def test_real_segmentations_of_a_nifti_folder_follow_the_images_onto_the_grid(generated, tmp_path):
    """A NIfTI folder of real volumes at 4x finer in-plane spacing: the segmentations (its labels) are
    resampled and cropped with the images, so they match the labels there."""
    import nibabel as nib

    from lad_fast.evaluate.datasets import read_real
    from lad_fast.evaluate.external import ExternalSegmentations

    folder = tmp_path / "nifti_real"
    shutil.copytree(generated, folder)
    for sub in ("images", "masks"):
        for f in (folder / sub).iterdir():
            img = nib.load(str(f))
            data = np.repeat(np.repeat(np.asarray(img.dataobj), 4, axis=0), 4, axis=1)
            aff = img.affine.copy()
            aff[:3, :2] /= 4
            nib.save(nib.Nifti1Image(data, aff), str(f))
    segs = ExternalSegmentations.open(copy_masks(folder, tmp_path / "segs"), "canonical")
    back = read_real(folder, ((16, 64, 64), (4.6, 6.4, 6.4)), (-1000.0, 400.0), segs)
    assert back.segmentations is not None and back.masks is not None
    assert np.array_equal(back.segmentations, back.masks) and back.masks.any()


# ------------------------------------------------------------------------------------------ bad input


def test_a_missing_segmentation_is_named(real, generated, weights, tmp_path, capsys):
    segs = copy_masks(generated, tmp_path / "segs")
    (segs / "lad_000001.nii.gz").unlink()
    out = tmp_path / "e.json"
    code, _, err = run_cli(_args(real, generated, weights, segs, out), capsys)
    _assert_refused(code, err, r"no segmentation for 1 of 3 synthetic volumes \(first: lad_000001\)", out)


def test_a_missing_real_segmentation_is_named(real, generated, weights, tmp_path, capsys):
    segs = copy_masks(generated, tmp_path / "segs")
    real_segs = tmp_path / "real_segs"
    real_segs.mkdir()
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        _args(real, generated, weights, segs, out, "--real-segmentations", str(real_segs)), capsys
    )
    _assert_refused(code, err, rf"no segmentation for {N_REAL} of {N_REAL} real volumes \(first: ", out)


def test_a_segmentation_of_another_shape_is_refused(real, generated, weights, tmp_path, capsys):
    from lad_fast.data.io import write_nifti

    segs = copy_masks(generated, tmp_path / "segs")
    write_nifti(segs / "lad_000002.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4), kind="labels")
    out = tmp_path / "e.json"
    code, _, err = run_cli(_args(real, generated, weights, segs, out), capsys)
    _assert_refused(
        code, err, r"lad_000002.nii.gz: segmentation has shape \(8, 8, 8\).*its volume images/lad_000002", out
    )


def test_a_segmentation_on_a_shifted_grid_is_refused(generated, tmp_path):
    import nibabel as nib

    from lad_fast.errors import InputError
    from lad_fast.evaluate.report import synthetic_fidelity

    segs = copy_masks(generated, tmp_path / "segs")
    img = nib.load(str(segs / "lad_000000.nii.gz"))
    aff = img.affine.copy()
    aff[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(segs / "lad_000000.nii.gz"))
    with pytest.raises(InputError, match=r"segmentation grid is up to 5 mm away from its volume"):
        synthetic_fidelity(generated, segmentations=segs, device="cpu")


def test_an_unknown_vocabulary_is_refused(real, generated, weights, tmp_path, capsys):
    segs = copy_masks(generated, tmp_path / "segs")
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        _args(real, generated, weights, segs, out, "--segmentation-vocabulary", "amos"), capsys
    )
    _assert_refused(
        code, err, r"unknown segmentation vocabulary 'amos'; choose one of totalseg, canonical", out
    )


def test_labels_outside_the_vocabulary_warn_or_with_strict_are_refused(
    real,
    generated,
    weights,
    tmp_path,
    capsys,
):
    import nibabel as nib

    from lad_fast.data.labels import UnknownLabelWarning
    from lad_fast.evaluate.report import synthetic_fidelity

    segs = copy_masks(generated, tmp_path / "segs")
    img = nib.load(str(segs / "lad_000000.nii.gz"))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 200
    nib.save(nib.Nifti1Image(data, img.affine), str(segs / "lad_000000.nii.gz"))
    with pytest.warns(UnknownLabelWarning, match=r"label ids \[200\] are outside the canonical vocabulary"):
        rep = synthetic_fidelity(generated, segmentations=segs, device="cpu")
    assert rep["synthetic"]["dice"]["liver"] == 1.0  # id 200 became background
    out = tmp_path / "e.json"
    code, _, err = run_cli(_args(real, generated, weights, segs, out, "--strict"), capsys)
    _assert_refused(
        code, err, r"label ids \[200\] are outside the canonical vocabulary \(without --strict", out
    )


def test_real_segmentations_without_synthetic_ones_are_refused(real, generated, tmp_path, capsys):
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        ["--real", str(real), "--synthetic", str(generated), "--real-segmentations", str(tmp_path),
         "--out", str(out)], capsys,
    )  # fmt: skip
    _assert_refused(code, err, r"--real-segmentations .* pass its masks of the synthetic volumes too", out)


def test_real_segmentations_of_a_prepared_dataset_follow_it_onto_another_grid(real, tmp_path):
    """A prepared dataset read onto a smaller synthetic grid: the segmentations go source grid ->
    prepared grid -> evaluation grid, as the labels do, so they match the labels there."""
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.evaluate.datasets import read_real
    from lad_fast.evaluate.external import ExternalSegmentations

    ds = PreparedDataset(real)
    sources = {i: Path(ds.entry(i)["mask_source"]) for i in ds.case_ids}
    segs = ExternalSegmentations.open(organ_folders(sources, tmp_path / "real_segs"))
    back = read_real(real, ((16, 48, 48), (4.6, 6.4, 6.4)), (-1000.0, 400.0), segs)
    assert back.segmentations is not None and back.masks is not None
    assert back.segmentations.shape == (N_REAL, 16, 48, 48) and back.masks.any()
    # the organs TotalSegmentator names are where the labels have them (the lesion it does not know)
    from lad_fast.data.labels import CANONICAL_ID

    known = back.masks != CANONICAL_ID["pancreatic_lesion"]
    assert np.array_equal(back.segmentations[known], back.masks[known])


def test_segmenter_features_with_segmentations_load_the_segmenter_for_features_only(real, seg_run, tmp_path):
    """--features segmenter still needs a lad-fast segmenter, but the masks scored are the external ones
    (a segmenter trained for 2 steps would not reach Dice 1)."""
    from lad_fast.errors import InputError
    from lad_fast.evaluate.report import evaluate

    gen = write_synthetic(tmp_path / "gen", real, seg_run)
    segs = copy_masks(gen, tmp_path / "segs")
    rep = evaluate(real, gen, segmentations=segs, device="cpu")
    assert rep["features"]["extractor"] == "segmenter" and rep["segmenter"]["run"] == str(seg_run.resolve())
    assert rep["fidelity"]["synthetic"]["mean_dice"] == 1.0 and rep["segmentations"]["source"] == str(segs)
    orphan = write_synthetic(tmp_path / "orphan", real, None)
    with pytest.raises(InputError, match="manifest names no single run that made it; pass --segmenter RUN"):
        evaluate(real, orphan, segmentations=copy_masks(orphan, tmp_path / "segs2"), device="cpu")


def test_a_json_label_map_names_the_segmentation_ids(generated, tmp_path):
    """Label files in a user's ids: a JSON map that knows liver and spleen only."""
    import nibabel as nib

    from lad_fast.data.labels import CANONICAL_ID, UnknownLabelWarning
    from lad_fast.evaluate.report import synthetic_fidelity

    segs = copy_masks(generated, tmp_path / "segs")
    for f in segs.iterdir():  # liver -> 40, spleen -> 41, every other organ keeps its canonical id
        img = nib.load(str(f))
        data = np.asarray(img.dataobj).copy()
        data[data == CANONICAL_ID["liver"]] = 40
        data[data == CANONICAL_ID["spleen"]] = 41
        nib.save(nib.Nifti1Image(data, img.affine), str(f))
    table = tmp_path / "ids.json"
    table.write_text(json.dumps({"40": "liver", "41": "spleen"}))
    with pytest.warns(UnknownLabelWarning, match="outside the user map vocabulary"):
        rep = synthetic_fidelity(generated, segmentations=segs, segmentation_vocabulary=table, device="cpu")
    assert rep["segmentations"]["vocabulary"] == str(table)
    dice = rep["synthetic"]["dice"]
    assert dice["liver"] == 1.0 and dice["spleen"] == 1.0 and dice["pancreas"] == 0.0
