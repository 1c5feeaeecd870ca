from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lad_fast.cli.app import main
from lad_fast.config import get_preset
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.data.prepare import prepare_dataset, read_report, skipped_summary
from lad_fast.data.prepared import PreparedDataset, export_case_nifti
from lad_fast.errors import InputError, OutputExistsError

TINY = get_preset("tiny")
PANCREAS = CANONICAL_ID["pancreas"]
# A tiny case that is large enough for the `tiny` preset (16x64x64 at 4.6x6.4x6.4 mm; half of its field of
# view is 36.8 x 204.8 x 204.8 mm): 40 x 40 x 12 voxels at 6.4 x 6.4 x 4.6 mm.
SHAPE = (40, 40, 12)
AFFINE = np.diag([6.4, 6.4, 4.6, 1.0])
AFFINE[:3, 3] = (-120.0, -130.0, 40.0)


def synthetic(shape=SHAPE, seed=0):
    """Soft-tissue body with a pancreas blob (TotalSegmentator id 7) and liver (5)."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, np.float32)
    hu[5:35, 6:34] = 40.0 + rng.normal(0, 5, size=(30, 28, shape[2]))
    seg = np.zeros(shape, np.uint8)
    seg[18:26, 15:20, 4:8] = 7
    seg[8:16, 10:25, 2:10] = 5
    hu[seg == 7] = 120.0
    return hu, seg


def write_case(root: Path, case_id="c1", hu=None, seg=None, affine=AFFINE, seg_affine=None, vocab="totalseg"):
    """Flat layout: images/<id>.nii.gz, masks/<id>.nii.gz, labels.json."""
    if hu is None or seg is None:
        hu0, seg0 = synthetic()
        hu = hu0 if hu is None else hu
        seg = seg0 if seg is None else seg
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(hu), affine), root / "images" / f"{case_id}.nii.gz")
    nib.save(
        nib.Nifti1Image(np.asarray(seg), affine if seg_affine is None else seg_affine),
        root / "masks" / f"{case_id}.nii.gz",
    )
    (root / "labels.json").write_text(json.dumps({"vocabulary": vocab}))
    return root / "images" / f"{case_id}.nii.gz"


def cli_prepare(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["prepare", *args, "--preset", "tiny"])
    err = capsys.readouterr().err
    return exc.value.code, err


def assert_one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.startswith("lad-fast: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


# ---------------------------------------------------------------------------------------- the real CT


@pytest.fixture(scope="module")
def totalseg_prepared(tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("prep") / "lad"
    index = prepare_dataset(shared / "totalseg_example", out, get_preset("lad"))
    return shared / "totalseg_example", out, index


def world_of(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return (affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]


def test_totalseg_case_has_lad_geometry_and_holds_the_pancreas(totalseg_prepared):
    src, out, index = totalseg_prepared
    assert index["preset"] == "lad" and len(index["cases"]) == 1
    entry = index["cases"][0]
    assert entry["shape"] == [32, 256, 256] and entry["has_mask"] and entry["vocabulary"] == "totalseg"
    assert entry["mask_source"].endswith("seg.nii.gz") and len(entry["content_hash"]) == 64
    item = PreparedDataset(out, expect_preset="lad")[0]
    assert isinstance(item["image"], np.memmap) and item["image"].dtype == np.float16
    assert item["mask"].shape == (32, 256, 256) and item["structure"].dtype == np.int64

    # Independently of the geometry code: every source pancreas voxel centre lies inside the window's
    # axial extent (the prepared affine's z range, half a 2.3 mm slice beyond the outer centres).
    seg = nib.load(src / "seg.nii.gz")
    z = world_of(seg.affine, np.argwhere(np.asarray(seg.dataobj) == 7).T)[2]
    a = item["affine"]
    z_lo, z_hi = sorted([(a @ [0, 0, 0, 1])[2], (a @ [31, 0, 0, 1])[2]])
    assert z_lo - 1.15 <= z.min() and z.max() <= z_hi + 1.15, (z.min(), z.max(), z_lo, z_hi)
    # and the prepared pancreas has the source's volume (3 mm voxels vs 2.3 x 1.6 x 1.6 mm voxels)
    source_ml = (np.asarray(seg.dataobj) == 7).sum() * 27e-3
    prepared_ml = (np.asarray(item["mask"]) == PANCREAS).sum() * 2.3 * 1.6 * 1.6e-3
    assert abs(prepared_ml / source_ml - 1) < 0.1, (source_ml, prepared_ml)


def test_totalseg_case_written_back_overlays_the_source(totalseg_prepared, tmp_path):
    src, out, index = totalseg_prepared
    ct_path, mask_path = export_case_nifti(out, index["cases"][0]["id"], tmp_path)
    ct, seg = nib.load(src / "ct.nii.gz"), nib.load(src / "seg.nii.gz")
    back, back_mask = nib.load(ct_path), nib.load(mask_path)
    assert back.get_data_dtype() == np.int16 and back_mask.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(back.affine) == ("R", "A", "S")

    # Sample the written case at every source voxel centre through the two affines.
    src_idx = np.indices(ct.shape).reshape(3, -1)
    coords = np.linalg.solve(
        back.affine, np.vstack([world_of(ct.affine, src_idx), np.ones(src_idx.shape[1])])
    )
    coords = coords[:3]
    inside = np.all((coords >= 0) & (coords <= np.array(back.shape)[:, None] - 1), axis=0)
    assert inside.sum() > 0.3 * inside.size  # the 73.6 mm window covers most of the 90 mm source
    hu_back = ndimage.map_coordinates(np.asarray(back.dataobj, np.float32), coords[:, inside], order=1)
    hu_src = np.clip(np.asarray(ct.dataobj, np.float32).reshape(-1)[inside], -1000, 400)
    err = np.abs(hu_back - hu_src)
    # Linear 3 mm -> 1.6/2.3 mm -> 3 mm resampling blurs edges (a 1000 HU air/skin step spreads over a
    # voxel) and CT noise differs voxel to voxel, so the error is not zero: measured median 5.8 HU, mean
    # 15.7 HU. Shifting the written case by one prepared voxel (1.6 mm in-plane or 2.3 mm axially) gives
    # a median of 9.4 to 10.4 HU and a mean of 25 to 35 HU, so these bounds catch a one-voxel offset.
    assert np.median(err) < 8, np.median(err)
    assert err.mean() < 20, err.mean()

    # Labels: nearest back onto the source grid. The prepared grid is finer than the source on every
    # axis, so each source voxel finds its own label again: Dice of pancreas and liver is 1 (measured).
    lab_back = ndimage.map_coordinates(np.asarray(back_mask.dataobj), coords[:, inside], order=0)
    lab_src = np.asarray(seg.dataobj).reshape(-1)[inside]
    for organ, src_id in (("pancreas", 7), ("liver", 5)):
        a, b = lab_back == CANONICAL_ID[organ], lab_src == src_id
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.99, (organ, dice)


# --------------------------------------------------------------------------------- synthetic datasets


def test_prepare_tiny_synthetic_and_read_back(tmp_path):
    write_case(tmp_path / "src", "c1")
    write_case(tmp_path / "src", "c2", *synthetic(seed=1))
    out = tmp_path / "out"
    index = prepare_dataset(tmp_path / "src", out, TINY)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == json.loads(json.dumps(index))
    assert on_disk["schema_version"] == 1 and on_disk["preset"] == "tiny" and on_disk["layout"] == "flat"
    assert on_disk["geometry"]["shape"] == [16, 64, 64] and on_disk["organs"][PANCREAS] == "pancreas"
    assert [c["id"] for c in on_disk["cases"]] == ["c1", "c2"]
    ds = PreparedDataset(out, expect_preset="tiny")
    assert len(ds) == 2 and ds.case_ids == ["c1", "c2"] and ds.geometry == TINY.geometry
    item = ds[1]
    assert item["id"] == "c2" and item["image"].shape == (16, 64, 64)
    assert np.load(out / "cases" / "c2" / "image.npy", mmap_mode="r").dtype == np.float16
    assert set(np.unique(item["mask"])) == {0, CANONICAL_ID["liver"], PANCREAS}
    assert -1 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    from lad_fast.conditioning.conditions import structure_condition

    np.testing.assert_array_equal(
        item["structure"], structure_condition(np.asarray(item["mask"]), TINY.condition)
    )


def test_export_overlays_synthetic_source(tmp_path):
    hu, seg = synthetic()
    write_case(tmp_path / "src", "c1", hu, seg)
    prepare_dataset(tmp_path / "src", tmp_path / "out", TINY)
    _, mask_path = export_case_nifti(tmp_path / "out", "c1", tmp_path / "nii")
    back = nib.load(mask_path)
    # world centroid of the pancreas in the source and in the written mask agree within a voxel
    c_src = world_of(AFFINE, np.argwhere(seg == 7).T).mean(axis=1)
    c_back = world_of(back.affine, np.argwhere(np.asarray(back.dataobj) == PANCREAS).T).mean(axis=1)
    np.testing.assert_allclose(c_back, c_src, atol=3.2)
    with pytest.raises(InputError, match=r"no case 'nope' \(cases: c1\)"):
        export_case_nifti(tmp_path / "out", "nope", tmp_path / "nii")


def test_rerun_skips_complete_cases_and_redoes_changed_ones(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_case(src, "c1")
    write_case(src, "c2", *synthetic(seed=2))
    prepare_dataset(src, out, TINY)
    stamp = {c: (out / "cases" / c / "image.npy").stat().st_mtime_ns for c in ("c1", "c2")}
    index = prepare_dataset(src, out, TINY)
    assert [c["id"] for c in index["cases"]] == ["c1", "c2"]
    assert all((out / "cases" / c / "image.npy").stat().st_mtime_ns == stamp[c] for c in stamp)
    write_case(src, "c2", *synthetic(seed=3))  # new content: new hash
    prepare_dataset(src, out, TINY)
    assert (out / "cases" / "c1" / "image.npy").stat().st_mtime_ns == stamp["c1"]
    assert (out / "cases" / "c2" / "image.npy").stat().st_mtime_ns != stamp["c2"]


def test_interrupted_case_leaves_no_visible_folder(tmp_path, monkeypatch):
    import lad_fast.conditioning.conditions

    src, out = tmp_path / "src", tmp_path / "out"
    write_case(src, "c1")
    write_case(src, "c2", *synthetic(seed=1))
    real = lad_fast.conditioning.conditions.structure_condition
    calls = []

    def interrupt_second(mask, cfg):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(mask, cfg)

    monkeypatch.setattr(lad_fast.conditioning.conditions, "structure_condition", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, out, TINY)
    assert sorted(os.listdir(out / "cases")) == ["c1"]  # no c2, not even a hidden temporary
    assert [c["id"] for c in json.loads((out / "index.json").read_text())["cases"]] == ["c1"]
    monkeypatch.setattr(lad_fast.conditioning.conditions, "structure_condition", real)
    stamp = (out / "cases" / "c1" / "image.npy").stat().st_mtime_ns
    index = prepare_dataset(src, out, TINY)
    assert [c["id"] for c in index["cases"]] == ["c1", "c2"]
    assert (out / "cases" / "c1" / "image.npy").stat().st_mtime_ns == stamp


def test_interrupted_first_case_leaves_no_output_folder(tmp_path, monkeypatch):
    import lad_fast.conditioning.conditions

    write_case(tmp_path / "src", "c1")

    def boom(mask, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(lad_fast.conditioning.conditions, "structure_condition", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tmp_path / "src", tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ datasets with bad scans


def _write_real(root: Path, case_id: str, ct: nib.Nifti1Image, seg: nib.Nifti1Image, j: slice) -> None:
    """The real CT and its label map cut to rows ``j`` along the posterior-anterior axis (a real crop)."""
    affine = ct.affine.copy()
    affine[:3, 3] += (j.start or 0) * affine[:3, 1]
    for folder, img in (("images", ct), ("masks", seg)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, j], affine), root / folder / f"{case_id}.nii.gz")
    (root / "labels.json").write_text(json.dumps({"vocabulary": "totalseg"}))


def test_skip_invalid_prepares_the_rest_and_reports_a_too_small_real_crop(tmp_path, shared, capsys):
    ct = nib.load(shared / "totalseg_example" / "ct.nii.gz")
    seg = nib.load(shared / "totalseg_example" / "seg.nii.gz")
    src, out = tmp_path / "src", tmp_path / "out"
    _write_real(src, "whole", ct, seg, slice(None))  # 101 rows of 3 mm: 303 mm
    _write_real(src, "cropped", ct, seg, slice(20, 80))  # 60 rows: 180 mm, under half of 409.6 mm
    reason = (
        "too small along axis H (posterior-anterior): covers 180.0 mm, needs at least 204.8 mm (0.5 of the "
        "preset's 409.6 mm field of view); no preset fits it (the least any preset needs along this axis "
        "is 204.8 mm): use a scan that covers more of the body"
    )
    code, err = cli_prepare(capsys, str(src), str(out))
    assert_one_line_error(code, err, str(src / "images" / "cropped.nii.gz"), reason)
    assert not out.exists()

    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(src), str(out), "--preset", "tiny", "--skip-invalid"])
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    assert captured.out == f"prepared 1 case in {out}\n"
    report_path = out / "prepare_report.json"
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"skipped 1 invalid case (details in {report_path}): cropped: {reason}")
    report = json.loads(report_path.read_text())
    assert report["prepared"] == ["whole"] and report["source"] == str(src)
    [skipped] = report["skipped"]
    assert skipped["id"] == "cropped" and skipped["reason"].startswith(reason)
    assert skipped["image"] == str(src / "images" / "cropped.nii.gz")
    assert skipped["mask"] == str(src / "masks" / "cropped.nii.gz")
    assert PreparedDataset(out).case_ids == ["whole"] and sorted(os.listdir(out / "cases")) == ["whole"]

    # Without the flag, a report of an earlier run would describe cases this run prepared: it goes.
    (src / "images" / "cropped.nii.gz").unlink()
    (src / "masks" / "cropped.nii.gz").unlink()
    assert [c["id"] for c in prepare_dataset(src, out, TINY)["cases"]] == ["whole"]
    assert sorted(os.listdir(out)) == ["cases", "index.json"]


def test_skip_invalid_skips_cases_whose_voxels_are_bad_and_refuses_when_none_is_left(tmp_path):
    hu, seg = synthetic()
    bad = hu.copy()
    bad[3, 4, 5] = np.nan
    write_case(tmp_path / "src", "a_nan", bad, seg)
    write_case(tmp_path / "src", "b_good", hu, seg)
    index = prepare_dataset(tmp_path / "src", tmp_path / "out", TINY, skip_invalid=True)
    assert [c["id"] for c in index["cases"]] == ["b_good"]
    report = read_report(tmp_path / "out")
    assert [s["id"] for s in report["skipped"]] == ["a_nan"]
    assert (
        report["skipped"][0]["reason"] == "1 voxels are NaN or Inf; fill them (e.g. with -1000 HU) and retry"
    )
    assert skipped_summary(report) == (
        f"skipped 1 invalid case (details in {tmp_path / 'out' / 'prepare_report.json'}): a_nan: 1 voxels "
        "are NaN or Inf; fill them (e.g. with -1000 HU) and retry"
    )
    assert sorted(os.listdir(tmp_path / "out" / "cases")) == ["b_good"]  # no trace of a_nan

    write_case(tmp_path / "only_bad", "a_nan", bad, seg)
    with pytest.raises(
        InputError, match=r"only_bad: no case could be prepared, all 1 are invalid \(a_nan: 1 voxels"
    ):
        prepare_dataset(tmp_path / "only_bad", tmp_path / "out2", TINY, skip_invalid=True)
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------- reading errors


def test_prepared_dataset_errors(tmp_path):
    with pytest.raises(InputError, match=r"nothing: no index\.json; not a prepared dataset"):
        PreparedDataset(tmp_path / "nothing")
    write_case(tmp_path / "src", "c1")
    prepare_dataset(tmp_path / "src", tmp_path / "out", TINY)
    with pytest.raises(
        InputError,
        match=r"prepared at preset 'tiny', but 'lad' is needed; use it as prepared with --preset tiny \(and "
        r"models trained at that preset\), or re-prepare it with `lad-fast prepare SRC OUT --preset lad`",
    ):
        PreparedDataset(tmp_path / "out", expect_preset="lad")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    index["schema_version"] = 99
    (tmp_path / "out" / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"schema version 99, this lad-fast reads 1; re-prepare"):
        PreparedDataset(tmp_path / "out")


def test_other_preset_in_out_needs_force(tmp_path):
    write_case(tmp_path / "src", "c1")
    prepare_dataset(tmp_path / "src", tmp_path / "out", TINY)
    with pytest.raises(
        OutputExistsError,
        match=r"prepared at preset 'tiny' \(or by another lad-fast version\), not 'lad'.*--force",
    ):
        prepare_dataset(tmp_path / "src", tmp_path / "out", get_preset("lad"))


# ------------------------------------------------------------------------------ bad input, via the CLI


def test_missing_and_empty_folders(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli_prepare(capsys, str(tmp_path / "missing"), str(out))
    assert_one_line_error(code, err, "missing")
    (tmp_path / "empty").mkdir()
    code, err = cli_prepare(capsys, str(tmp_path / "empty"), str(out))
    assert_one_line_error(code, err, "empty")
    assert not out.exists()


def test_truncated_nifti(tmp_path, capsys):
    path = write_case(tmp_path / "src", "c1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_line_error(code, err, str(path), "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(40, 40), (40, 40, 12, 3)])
def test_2d_and_4d_images(tmp_path, capsys, shape):
    hu, seg = synthetic()
    hu = np.zeros(shape, np.float32)
    path = write_case(tmp_path / "src", "c1", hu, seg)
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_line_error(code, err, str(path), str(shape))
    assert not (tmp_path / "out").exists()


def test_nan_voxels(tmp_path, capsys):
    hu, seg = synthetic()
    hu[3, 4, 5] = np.nan
    path = write_case(tmp_path / "src", "c1", hu, seg)
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_line_error(code, err, str(path), "NaN")
    assert not (tmp_path / "out").exists()


def test_mismatched_image_and_mask(tmp_path, capsys):
    hu, seg = synthetic()
    write_case(tmp_path / "a", "c1", hu, seg[:, :, :11])
    code, err = cli_prepare(capsys, str(tmp_path / "a"), str(tmp_path / "out"))
    assert_one_line_error(code, err, "c1.nii.gz", "shapes differ")
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    write_case(tmp_path / "b", "c1", hu, seg, seg_affine=shifted)
    code, err = cli_prepare(capsys, str(tmp_path / "b"), str(tmp_path / "out"))
    assert_one_line_error(
        code, err, str(tmp_path / "b" / "masks" / "c1.nii.gz"), "affines differ by up to 5 mm"
    )
    assert not (tmp_path / "out").exists()


def test_too_small(tmp_path, capsys):
    hu, seg = synthetic(shape=(40, 40, 7))  # 7 x 4.6 = 32.2 mm < 36.8 mm
    path = write_case(tmp_path / "src", "c1", hu, seg)
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_line_error(
        code,
        err,
        str(path),
        "too small along axis D",
        "covers 32.2 mm, needs at least 36.8 mm (0.5 of the preset's 73.6 mm field of view); no preset fits "
        "it (the least any preset needs along this axis is 36.8 mm)",
        "--skip-invalid",
    )
    assert not (tmp_path / "out").exists()


def test_foreign_files_in_out_need_force(tmp_path, capsys):
    write_case(tmp_path / "src", "c1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(out))
    assert_one_line_error(code, err, str(out), "notes.txt", "--force")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(out), "--force")
    assert code in (0, None), err
    assert sorted(os.listdir(out)) == ["cases", "index.json", "notes.txt"]


def test_unknown_label_ids_warn_or_fail_with_strict(tmp_path, capsys):
    hu, seg = synthetic()
    seg[30:33, 30:33, 2:4] = 200  # not a TotalSegmentator v2 id
    write_case(tmp_path / "src", "c1", hu, seg)
    mask = str(tmp_path / "src" / "masks" / "c1.nii.gz")
    code, err = cli_prepare(capsys, str(tmp_path / "src"), str(tmp_path / "out"), "--strict")
    assert_one_line_error(code, err, mask, "[200]")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match=r"c1\.nii\.gz: label ids \[200\] are outside"):
        code, err = cli_prepare(capsys, str(tmp_path / "src"), str(tmp_path / "out"))
    assert code in (0, None), err
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["cases"][0]["unknown_labels"] == [200]
