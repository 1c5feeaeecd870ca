"""Readers, check_pair and write_nifti: real DICOM and NIfTI samples plus tiny synthetic files."""

from __future__ import annotations

import gzip
import shutil
import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lad_fast.data.io import check_pair, read_image, read_labels, write_nifti
from lad_fast.data.volume import Volume
from lad_fast.errors import BackendUnavailableError, InputError

RAS = np.array(
    [
        [1.5, 0.0, 0.0, -10.0],
        [0.0, 0.8, 0.0, 20.0],
        [0.0, 0.0, 2.5, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _world_table(vol: Volume) -> np.ndarray:
    """(N, 4) rows (x, y, z, value) sorted by world position: independent of voxel order."""
    idx = np.indices(vol.shape).reshape(3, -1)
    world = vol.affine[:3, :3] @ idx + vol.affine[:3, 3:4]
    table = np.vstack([np.round(world, 4), vol.array.reshape(-1)]).T
    return table[np.lexsort(table[:, 2::-1].T)]


# --- DICOM ----------------------------------------------------------------------------------------------


def test_dicom_series_geometry_from_tags(shared: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    folder = shared / "totalseg_example" / "dicom"
    slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    first = np.array(slices[0].ImagePositionPatient, dtype=float)
    last = np.array(slices[-1].ImagePositionPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing  # i runs along a row (across columns)
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = (last - first) / (len(slices) - 1)
    lps[:3, 3] = first
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    vol = read_image(folder)

    assert vol.shape == (slices[0].Columns, slices[0].Rows, len(slices)) == (512, 512, 20)
    assert vol.array.dtype == np.float32 and vol.affine.dtype == np.float64
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)  # not SliceThickness 3
    # Voxel (i, j, k) holds pixel (row j, column i) of the k-th slice, rescaled to HU.
    for k in (0, 7, 19):
        ds = slices[k]
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[:, :, k], hu.T.astype(np.float32))
        world_lps = np.array(ds.ImagePositionPatient, dtype=float) + 300 * col_spacing * iop[:3]
        world_lps += 100 * row_spacing * iop[3:]
        np.testing.assert_allclose(vol.affine @ [300, 100, k, 1], [*(world_lps * [-1, -1, 1]), 1], atol=1e-4)
    assert -1100 <= vol.array.min() < -900  # air
    assert 500 < vol.array.max() < 4000  # bone
    assert -1000 < float(np.median(vol.array[128:384, 128:384])) < 300  # body inside the field of view


def _copy_slices(shared: Path, dst: Path, n: int) -> list[Path]:
    src = sorted((shared / "totalseg_example" / "dicom").iterdir())[:n]
    dst.mkdir()
    return [Path(shutil.copy(p, dst / p.name)) for p in src]


def test_dicom_mixed_series_is_an_error(shared: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    files = _copy_slices(shared, tmp_path / "mixed", 3)
    ds = pydicom.dcmread(files[1])
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(files[1])
    with pytest.raises(InputError, match=r"mixed: folder mixes 2 DICOM series .*1\.2\.3\.4\.5.*own folder"):
        read_image(tmp_path / "mixed")


def test_dicom_gap_and_single_file(shared: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    files = _copy_slices(shared, tmp_path / "gap", 4)
    files[2].unlink()
    with pytest.raises(InputError, match=r"gap: slice spacing is uneven \(2\.000 to 4\.000 mm\)"):
        read_image(tmp_path / "gap")
    with pytest.raises(InputError, match=r"a single DICOM file; pass the folder"):
        read_image(files[0])


def test_dicom_without_pydicom(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(
        BackendUnavailableError, match=r'dicom: reading DICOM needs pydicom; pip install "lad-fast\[dicom\]"'
    ):
        read_image(shared / "totalseg_example" / "dicom")


# --- NIfTI images ----------------------------------------------------------------------------------------


def test_nifti_orientation_invariant(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(8, 6, 5)).astype(np.int16)
    ras = read_image(_save(tmp_path / "ras.nii.gz", data))
    # LPS: i and j run the other way; the affine moves the origin to the old far corner.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    lps = read_image(_save(tmp_path / "lps.nii.gz", data[::-1, ::-1].copy(), RAS @ flip))
    # Axes permuted (k, i, j) and stored as float32.
    perm = np.zeros((4, 4))
    perm[[0, 1, 2, 3], [1, 2, 0, 3]] = 1.0
    permuted = read_image(_save(tmp_path / "pir.nii", data.transpose(2, 0, 1).astype(np.float32), RAS @ perm))

    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S") and lps.shape == (8, 6, 5)
    assert permuted.shape == (5, 8, 6)
    reference = _world_table(ras)
    np.testing.assert_array_equal(_world_table(lps), reference)
    np.testing.assert_array_equal(_world_table(permuted), reference)
    np.testing.assert_array_equal(ras.array, data.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.float32])
def test_nifti_dtypes_read_as_float32(tmp_path: Path, dtype: type) -> None:
    data = np.arange(8 * 8 * 4).reshape(8, 8, 4).astype(dtype)
    vol = read_image(_save(tmp_path / "ct.nii.gz", data))
    assert vol.array.dtype == np.float32 and vol.source == str(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(vol.array, data.astype(np.float32))
    np.testing.assert_allclose(vol.affine, RAS, atol=1e-6)  # the header stores float32


def test_nifti_slope_intercept(tmp_path: Path) -> None:
    raw = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)
    path = _save(tmp_path / "scaled.nii", raw)
    with open(path, "r+b") as f:  # scl_slope and scl_inter live at bytes 112..120 of the NIfTI-1 header
        f.seek(112)
        f.write(struct.pack("<ff", 2.0, -1024.0))
    proxy = nib.load(str(path)).dataobj
    assert (proxy.slope, proxy.inter) == (2.0, -1024.0)
    gz = tmp_path / "scaled.nii.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    for p in (path, gz):
        np.testing.assert_array_equal(read_image(p).array, raw.astype(np.float32) * 2 - 1024)


def test_nifti_4d_singleton_is_squeezed(tmp_path: Path) -> None:
    data = np.ones((8, 8, 4, 1), dtype=np.int16)
    assert read_image(_save(tmp_path / "ct4.nii.gz", data)).shape == (8, 8, 4)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((8, 8, 4, 3), r"ct\.nii\.gz: volume is 4D \(shape \(8, 8, 4, 3\)\)"),
        ((8, 8), r"ct\.nii\.gz: volume is 2D \(shape \(8, 8\)\)"),
        ((8, 8, 1), r"ct\.nii\.gz: volume is 2D \(shape \(8, 8, 1\)\)"),
    ],
)
def test_nifti_wrong_dimensions(tmp_path: Path, shape: tuple[int, ...], message: str) -> None:
    path = _save(tmp_path / "ct.nii.gz", np.zeros(shape, dtype=np.int16))
    with pytest.raises(InputError, match=message):
        read_image(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nifti_non_finite_voxels(tmp_path: Path, bad: float) -> None:
    data = np.zeros((8, 8, 4), dtype=np.float32)
    data[1, 2, 3] = bad
    data[0, 0, 0] = -bad
    with pytest.raises(InputError, match=r"ct\.nii\.gz: 2 voxels are NaN or Inf"):
        read_image(_save(tmp_path / "ct.nii.gz", data))


def test_truncated_and_garbage_nifti(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    whole = _save(tmp_path / "whole.nii.gz", rng.integers(-1000, 1000, (16, 16, 8)).astype(np.int16))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for reader in (read_image, read_labels):
        with pytest.raises(
            InputError, match=r"cut\.nii\.gz: cannot read this NIfTI file, it is corrupt or truncated"
        ):
            reader(cut)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(InputError, match=r"junk\.nii\.gz: cannot read this NIfTI file"):
        read_image(junk)


def test_missing_empty_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: no such file or folder"):
        read_image(tmp_path / "nothere.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: folder is empty; expected a DICOM series"):
        read_image(tmp_path / "empty")
    with pytest.raises(InputError, match=r"empty: folder is empty; expected TotalSegmentator"):
        read_labels(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: unsupported file type"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("hello")
    with pytest.raises(InputError, match=r"stuff: folder holds no DICOM files"):
        read_image(tmp_path / "stuff")


# --- label maps -------------------------------------------------------------------------------------------


def test_labels_integer_types(tmp_path: Path) -> None:
    ids = np.zeros((8, 8, 4), dtype=np.int32)
    ids[2:4, 2:4, 1:3] = 5
    ids[5, 5, 2] = 300
    vol = read_labels(_save(tmp_path / "big.nii.gz", ids))
    assert vol.array.dtype == np.uint16
    np.testing.assert_array_equal(vol.array, ids)
    floats = read_labels(_save(tmp_path / "f.nii.gz", (ids % 256).astype(np.float32)))
    assert floats.array.dtype == np.uint8
    np.testing.assert_array_equal(floats.array, ids % 256)


def test_labels_non_integer_and_negative(tmp_path: Path) -> None:
    frac = np.zeros((8, 8, 4), dtype=np.float32)
    frac[1, 1, 1] = 2.5
    with pytest.raises(InputError, match=r"frac\.nii\.gz: label map holds non-integer values"):
        read_labels(_save(tmp_path / "frac.nii.gz", frac))
    neg = np.zeros((8, 8, 4), dtype=np.int16)
    neg[1, 1, 1] = -3
    with pytest.raises(InputError, match=r"neg\.nii\.gz: label map holds negative values \(min -3\)"):
        read_labels(_save(tmp_path / "neg.nii.gz", neg))


def test_sample_ct_and_seg(shared: Path) -> None:
    image = read_image(shared / "totalseg_example" / "ct.nii.gz")
    labels = read_labels(shared / "totalseg_example" / "seg.nii.gz")
    assert image.shape == labels.shape == (122, 101, 30)
    assert labels.array.dtype == np.uint8 and {1, 2, 3, 5, 7, 52} <= set(np.unique(labels.array).tolist())
    check_pair(image, labels)


def test_totalseg_organ_folder(tmp_path: Path) -> None:
    folder = tmp_path / "segmentations"
    folder.mkdir()
    masks = {
        name: np.zeros((8, 8, 4), dtype=np.uint8) for name in ("liver", "spleen", "vertebrae_L1", "skull")
    }
    masks["liver"][:4] = 1
    masks["spleen"][3:6] = 1  # overlaps the liver in row 3: the higher id (liver 5) wins
    masks["vertebrae_L1"][7, 7, :] = 1
    masks["skull"][6, 0, 0] = 1  # not kept by lad-fast: skipped
    for name, mask in masks.items():
        _save(folder / f"{name}.nii.gz", mask)
    vol = read_labels(folder)
    expected = np.zeros((8, 8, 4), dtype=np.uint8)
    expected[3:6] = 1
    expected[:4] = 5
    expected[7, 7, :] = 31
    np.testing.assert_array_equal(vol.array, expected)
    np.testing.assert_allclose(vol.affine, RAS, atol=1e-6)  # the header stores float32

    _save(folder / "pancreas.nii.gz", np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(InputError, match=r"spleen\.nii\.gz and .*pancreas\.nii\.gz: shapes differ"):
        read_labels(folder)
    other = tmp_path / "other"
    other.mkdir()
    _save(other / "skull.nii.gz", masks["skull"])
    with pytest.raises(InputError, match=r"other: no TotalSegmentator organ masks found"):
        read_labels(other)


def test_organ_folder_matches_label_map(shared: Path, tmp_path: Path) -> None:
    seg = read_labels(shared / "totalseg_example" / "seg.nii.gz")
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for name, organ_id in {"spleen": 1, "liver": 5, "pancreas": 7, "aorta": 52, "vertebrae_L1": 31}.items():
        _save(folder / f"{name}.nii.gz", (seg.array == organ_id).astype(np.uint8), seg.affine)
    vol = read_labels(folder)
    keep = np.isin(seg.array, [1, 5, 7, 52, 31])
    np.testing.assert_array_equal(vol.array, np.where(keep, seg.array, 0))


# --- check_pair -------------------------------------------------------------------------------------------


def test_check_pair_errors() -> None:
    image = Volume(np.zeros((8, 8, 4), np.float32), RAS.copy(), "ct.nii.gz")
    check_pair(image, Volume(np.zeros((8, 8, 4), np.uint8), RAS + 1e-5, "ok.nii.gz"))
    with pytest.raises(
        InputError, match=r"ct\.nii\.gz and m\.nii\.gz: shapes differ \(\(8, 8, 4\) vs \(8, 8, 5\)\)"
    ):
        check_pair(image, Volume(np.zeros((8, 8, 5), np.uint8), RAS, "m.nii.gz"))
    shifted = RAS.copy()
    shifted[1, 3] += 0.5
    with pytest.raises(InputError, match=r"ct\.nii\.gz and m\.nii\.gz: affines differ by up to 0\.5 mm"):
        check_pair(image, Volume(np.zeros((8, 8, 4), np.uint8), shifted, "m.nii.gz"))
    scaled = RAS.copy()
    scaled[2, 2] += 0.01  # 0.01 mm per slice: 0.03 mm at the last slice
    with pytest.raises(InputError, match=r"affines differ by up to 0\.03 mm"):
        check_pair(image, Volume(np.zeros((8, 8, 4), np.uint8), scaled, "m.nii.gz"))


# --- write_nifti ------------------------------------------------------------------------------------------


def test_write_nifti_image_and_labels(tmp_path: Path) -> None:
    lps = np.diag([-0.7, -0.7, 2.0, 1.0])
    lps[:3, 3] = [100.0, 50.0, -20.0]
    hu = np.full((8, 8, 4), -1000.0, dtype=np.float32)
    hu[0, 0, 0], hu[1, 0, 0], hu[2, 0, 0], hu[3, 0, 0] = 1.6, -2.4, 40000.0, -40000.0
    write_nifti(tmp_path / "ct.nii.gz", hu, lps, kind="image")
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    assert img.get_data_dtype() == np.int16
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), lps, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), lps, atol=1e-5)
    back = read_image(tmp_path / "ct.nii.gz")
    assert back.array[:4, 0, 0].tolist() == [2.0, -2.0, 32767.0, -32768.0]
    np.testing.assert_allclose(back.affine, lps, atol=1e-5)

    labels = np.zeros((8, 8, 4), dtype=np.int64)
    labels[2:5, 1:3, 1:3] = 7
    write_nifti(tmp_path / "seg.nii", labels, lps, kind="labels")
    assert nib.load(str(tmp_path / "seg.nii")).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_labels(tmp_path / "seg.nii").array, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "seg.nii"]  # no temporary files left


def test_write_nifti_rejects_bad_arguments(tmp_path: Path) -> None:
    zeros = np.zeros((8, 8, 4))
    with pytest.raises(ValueError, match=r'kind must be "image" or "labels", not \'mask\''):
        write_nifti(tmp_path / "x.nii.gz", zeros, np.eye(4), kind="mask")
    with pytest.raises(ValueError, match=r"labels must be integers in 0\.\.255"):
        write_nifti(tmp_path / "x.nii.gz", zeros - 1, np.eye(4), kind="labels")
    with pytest.raises(ValueError, match=r"end in \.nii or \.nii\.gz"):
        write_nifti(tmp_path / "x.nrrd", zeros, np.eye(4), kind="image")
    assert list(tmp_path.iterdir()) == []
