"""Reading CT volumes and label maps (NIfTI files, DICOM series, TotalSegmentator organ folders, the
official Lad ``.npy`` crops) and writing NIfTI.

Readers return a :class:`Volume` in the file's own voxel order with a voxel -> RAS mm affine; they never
resample or reorient (``lad_fast.data.geometry`` does). Every problem with an input raises
:class:`InputError` whose message starts with the file or folder it is about.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lad_fast.data.labels import TOTALSEG_V2_NAMES, integer_labels
from lad_fast.data.volume import Volume
from lad_fast.errors import BackendUnavailableError, InputError
from lad_fast.utils.atomic import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NPY_SUFFIX = ".npy"
AFFINE_TOLERANCE_MM = 1e-3
# The official Lad crops (LAD_REFERENCE.md, input geometry): (D, H, W) arrays without an affine, at
# 2.3 x 1.6 x 1.6 mm; images either in HU or mapped from the [-1000, 400] HU window to [-1, 1].
LAD_NPY_SPACING = (2.3, 1.6, 1.6)
LAD_NPY_HU_WINDOW = (-1000.0, 400.0)
LAD_NPY_ASSUMPTION = (
    "an official Lad .npy crop carries no affine: read with the identity orientation, its axes (D, H, W) "
    "running inferior to superior, posterior to anterior and toward the patient's right (lad-fast's "
    "prepared orientation) at "
    f"{' x '.join(f'{s:g}' for s in LAD_NPY_SPACING)} mm, an image whose values all lie in [-1, 1] as "
    "Lad's normalised -1000..400 HU; flip or convert crops that differ before preparing them"
)
# nibabel and gzip raise these for missing, foreign, corrupt or truncated files.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
)
_DICOM_HINT = 'pip install "lad-fast[dicom]"'


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def is_npy(path: Path) -> bool:
    return path.name.lower().endswith(NPY_SUFFIX) and not path.name.startswith(".")


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` carries the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (hidden files skipped), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)
    )


# --- NIfTI ------------------------------------------------------------------------------------------------


def _load_nifti(path: Path, as_float32: bool) -> tuple[Any, np.ndarray]:
    """(image, data with slope/intercept applied), fully read so that truncation shows here.

    ``as_float32`` decodes straight to float32 (images); otherwise the stored type is kept when the
    header holds no scaling (label maps).
    """
    from lad_fast.data.checks import check_nifti_size

    try:
        img = nib.load(str(path))
        check_nifti_size(path, img)  # before any voxel is allocated: a hostile header claims terabytes
        dtype = img.get_data_dtype()
        if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
            raise InputError(f"{path}: voxel type {dtype} is not a real number; need int or float voxels")
        data = img.get_fdata(dtype=np.float32) if as_float32 else np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: cannot read this NIfTI file, it is corrupt or truncated ({exc})") from None
    return img, data


def _as_3d(path: Path, data: np.ndarray) -> np.ndarray:
    """(I, J, K[, 1, ...]) -> (I, J, K); a 2D image, a single slice or a real 4D series is an error."""
    shape = data.shape
    if len(shape) > 3:
        if any(s != 1 for s in shape[3:]):
            raise InputError(f"{path}: volume is {len(shape)}D (shape {shape}); lad-fast needs one 3D volume")
        data = data.reshape(shape[:3])
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputError(
            f"{path}: volume is 2D (shape {shape}); lad-fast needs a 3D volume with several slices"
        )
    return data


def _check_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(
            f"{path}: the voxel-to-world affine is singular or not finite; fix the file's header"
        )
    return affine


def _read_nifti_image(path: Path) -> Volume:
    img, data = _load_nifti(path, as_float32=True)
    array = _as_3d(path, data)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or Inf; fill them (e.g. with -1000 HU) and retry")
    return Volume(np.ascontiguousarray(array), _check_affine(path, img.affine), str(path))


def _read_nifti_labels(path: Path) -> Volume:
    img, data = _load_nifti(path, as_float32=False)
    data = _as_3d(path, data)
    return Volume(
        np.ascontiguousarray(integer_labels(data, path)), _check_affine(path, img.affine), str(path)
    )


def _read_organ_folder(folder: Path) -> Volume:
    """TotalSegmentator's folder output: one binary ``<organ>.nii.gz`` per organ -> one v2-id map.

    Organs lad-fast does not keep are skipped (they would map to background anyway). Where masks
    overlap, the higher id wins, as TotalSegmentator does when it combines its masks.
    """
    files = {nifti_stem(p): p for p in folder.iterdir() if is_nifti(p)}
    kept = sorted((TOTALSEG_V2_NAMES[name], p) for name, p in files.items() if name in TOTALSEG_V2_NAMES)
    if not kept:
        raise InputError(
            f"{folder}: no TotalSegmentator organ masks found (expected files such as liver.nii.gz, "
            "spleen.nii.gz, pancreas.nii.gz)"
        )
    out: np.ndarray | None = None
    affine: np.ndarray | None = None
    first: Path | None = None
    for organ_id, path in kept:
        vol = _read_nifti_labels(path)
        if out is None:
            out, affine, first = np.zeros(vol.shape, dtype=np.uint8), vol.affine, path
        else:
            assert affine is not None and first is not None
            check_pair(Volume(out, affine, str(first)), vol)
        out[vol.array > 0] = organ_id
    assert out is not None and affine is not None
    return Volume(out, affine, str(folder))


# --- official Lad .npy crops -------------------------------------------------------------------------------


def lad_npy_affine() -> np.ndarray:
    """(4, 4) voxel -> RAS mm affine of a ``(D, H, W)`` Lad crop: D along S, H along A, W along R."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = LAD_NPY_SPACING
    affine[3, 3] = 1.0
    return affine


def _load_npy(path: Path) -> np.ndarray:
    """A 3D numeric array from ``path`` (no pickles), checked before its voxels are read."""
    import warnings

    from lad_fast.data.checks import check_grid_size

    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: cannot read this .npy file, it is corrupt or truncated ({exc})") from None
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(
            f"{path}: array has shape {data.shape}; a Lad crop is one 3D (D, H, W) volume such as 32x256x256"
        )
    numeric = np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_
    if not numeric or np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"{path}: array type {data.dtype} is not a real number; need int or float voxels")
    check_grid_size(data.shape, str(path))
    warnings.warn(LAD_NPY_ASSUMPTION, stacklevel=3)  # one text: Python shows it once per process
    return np.asarray(data)


def _read_npy_image(path: Path) -> Volume:
    array = _load_npy(path).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path}: voxels are NaN or Inf; fill them (e.g. with -1000 HU) and retry")
    if array.size and array.min() >= -1.0 and array.max() <= 1.0:  # Lad's normalised intensities
        lo, hi = LAD_NPY_HU_WINDOW
        array = (array + np.float32(1.0)) * np.float32((hi - lo) / 2.0) + np.float32(lo)
    return Volume(np.ascontiguousarray(array), lad_npy_affine(), str(path))


def _read_npy_labels(path: Path) -> Volume:
    labels = integer_labels(_load_npy(path), path)
    return Volume(np.ascontiguousarray(labels), lad_npy_affine(), str(path))


# --- DICOM ------------------------------------------------------------------------------------------------


def _import_pydicom(folder: Path) -> Any:
    try:
        import pydicom
    except ImportError:
        raise BackendUnavailableError(f"{folder}: reading DICOM needs pydicom; {_DICOM_HINT}") from None
    return pydicom


def _float_list(ds: Any, tag: str, n: int, path: Path) -> np.ndarray:
    value = getattr(ds, tag, None)
    if value is None or len(value) != n:
        raise InputError(f"{path}: DICOM tag {tag} is missing or malformed; cannot place the slice in space")
    return np.array([float(v) for v in value], dtype=np.float64)


def _read_dicom_series(folder: Path) -> Volume:
    """One DICOM series folder -> float32 HU (columns, rows, slices) with an RAS affine.

    Voxel (i, j, k) = (column, row, slice sorted along the slice normal). DICOM positions are LPS:
    i steps along the row direction cosine (ImageOrientationPatient[:3]) by PixelSpacing[1], j along
    the column cosine by PixelSpacing[0], k by the step between sorted ImagePositionPatient values.
    """
    pydicom = _import_pydicom(folder)
    headers = _series_headers(folder, pydicom)
    headers, pos, row_cos, col_cos = _sorted_slices(folder, headers)
    spacing = _float_list(headers[0][1], "PixelSpacing", 2, headers[0][0])  # (row spacing, column spacing)
    array = _series_pixels(folder, headers, pydicom)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    # The position step (not normal * thickness) also holds for tilted gantries and ignores SliceThickness,
    # which often differs from the true slice spacing.
    lps[:3, 2] = (pos[-1] - pos[0]) / (len(pos) - 1)
    lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(f"{folder}: {bad} voxels are NaN or Inf after rescaling")
    return Volume(array, _check_affine(folder, affine), str(folder))


def _series_headers(folder: Path, pydicom: Any) -> list[tuple[Path, Any]]:
    """The headers of every DICOM file in ``folder``, checked to form one single-frame series."""
    files = dicom_files(folder)
    if not files:
        raise InputError(f"{folder}: folder holds no DICOM files (and no NIfTI); expected a DICOM series")
    headers = []
    for path in files:
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"{path}: cannot read this DICOM file ({exc})") from None

    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise InputError(
            f"{folder}: folder mixes {len(series)} DICOM series ({', '.join(series)}); "
            "put each series in its own folder"
        )
    if int(getattr(headers[0][1], "NumberOfFrames", 1) or 1) > 1:
        raise InputError(
            f"{folder}: multi-frame (enhanced) DICOM is not supported; convert it to NIfTI first"
        )
    return headers


def _sorted_slices(
    folder: Path, headers: list[tuple[Path, Any]]
) -> tuple[list[tuple[Path, Any]], np.ndarray, np.ndarray, np.ndarray]:
    """Headers sorted along the slice normal, their (K, 3) LPS positions and the row and column cosines;
    refuses mixed orientations, a single slice, duplicate positions and uneven (missing) slices."""
    orient = _float_list(headers[0][1], "ImageOrientationPatient", 6, headers[0][0])
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    positions = []
    for path, ds in headers:
        if not np.allclose(_float_list(ds, "ImageOrientationPatient", 6, path), orient, atol=1e-4):
            raise InputError(f"{path}: slice orientation differs from the rest of the series in {folder}")
        positions.append(_float_list(ds, "ImagePositionPatient", 3, path))
    order = np.argsort([p @ normal for p in positions], kind="stable")
    headers = [headers[i] for i in order]
    pos = np.array([positions[i] for i in order])  # (K, 3) LPS mm

    if len(headers) < 2:
        raise InputError(f"{folder}: series has a single slice (2D); lad-fast needs a 3D volume")
    steps = np.diff(pos @ normal)
    if np.any(steps < 1e-3):
        raise InputError(f"{folder}: two slices share one position; the folder holds duplicate slices")
    if np.ptp(steps) > max(0.01 * float(np.median(steps)), 1e-3):
        raise InputError(
            f"{folder}: slice spacing is uneven ({steps.min():.3f} to {steps.max():.3f} mm); "
            "slices are missing from the series"
        )
    return headers, pos, row_cos, col_cos


def _series_pixels(folder: Path, headers: list[tuple[Path, Any]], pydicom: Any) -> np.ndarray:
    """(columns, rows, slices) float32 HU of the sorted series (rescale slope and intercept applied)."""
    ts = headers[0][1].file_meta.get("TransferSyntaxUID") if hasattr(headers[0][1], "file_meta") else None
    compressed = bool(ts is not None and ts.is_compressed)
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    from lad_fast.data.checks import check_grid_size

    check_grid_size((cols, rows, len(headers)), str(folder), "DICOM series")  # before allocating it
    array = np.empty((cols, rows, len(headers)), dtype=np.float32)
    for k, (path, _) in enumerate(headers):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:  # decoders raise many types; name the file either way
            decoders = importlib.util.find_spec("pylibjpeg") and importlib.util.find_spec("openjpeg")
            if compressed and not decoders:
                raise BackendUnavailableError(
                    f"{path}: no decoder for {ts.name} pixel data; {_DICOM_HINT}"
                ) from None
            raise InputError(f"{path}: cannot decode the pixel data ({exc})") from None
        if pixels.shape != (rows, cols):
            raise InputError(f"{path}: slice is {pixels.shape}, the series is {(rows, cols)}")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        array[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return array


# --- public -----------------------------------------------------------------------------------------------


def _existing(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    return path


def read_image(path: Path | str) -> Volume:
    """Read a CT volume: a NIfTI file (any orientation, int or float, slope/intercept applied), a DICOM
    series folder or an official Lad ``.npy`` crop (:data:`LAD_NPY_ASSUMPTION`).

    Returns float32 HU ``(I, J, K)`` in file voxel order and a (4, 4) float64 voxel -> RAS mm affine.
    """
    path = _existing(path)
    if path.is_dir():
        if not any(path.iterdir()):
            raise InputError(f"{path}: folder is empty; expected a DICOM series")
        return _read_dicom_series(path)
    if is_nifti(path):
        return _read_nifti_image(path)
    if is_npy(path):
        return _read_npy_image(path)
    if is_dicom_file(path):
        raise InputError(f"{path}: a single DICOM file; pass the folder that holds the whole series")
    raise InputError(
        f"{path}: unsupported file type; expected .nii, .nii.gz, an official Lad .npy crop or a DICOM "
        "series folder"
    )


def read_labels(path: Path | str) -> Volume:
    """Read a label map: an integer NIfTI (any int type, or float holding whole numbers), a
    TotalSegmentator folder of per-organ masks (returned in TotalSegmentator v2 ids) or an official Lad
    ``.npy`` crop (:data:`LAD_NPY_ASSUMPTION`; Lad's ids: 1 pancreas, 2 lesion).

    Returns ``(I, J, K)`` uint8/uint16/uint32 ids in file voxel order and the (4, 4) voxel -> RAS affine.
    """
    path = _existing(path)
    if path.is_dir():
        if not any(path.iterdir()):
            raise InputError(f"{path}: folder is empty; expected TotalSegmentator <organ>.nii.gz masks")
        return _read_organ_folder(path)
    if is_nifti(path):
        return _read_nifti_labels(path)
    if is_npy(path):
        return _read_npy_labels(path)
    raise InputError(
        f"{path}: unsupported label file; expected .nii, .nii.gz, an official Lad .npy crop or a folder "
        "of organ masks"
    )


def check_pair(image: Volume, labels: Volume) -> None:
    """Raise :class:`InputError` unless ``labels`` lies voxel for voxel on ``image``'s grid."""
    if image.shape != labels.shape:
        raise InputError(
            f"{image.source} and {labels.source}: shapes differ ({image.shape} vs {labels.shape}); "
            "the mask must be on the image's voxel grid"
        )
    # Compare where the two affines put the volume's corners: a difference in mm whatever its cause.
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    shift = float(np.abs((image.affine - labels.affine) @ corners)[:3].max())
    if shift > AFFINE_TOLERANCE_MM:
        raise InputError(
            f"{image.source} and {labels.source}: affines differ by up to {shift:.4g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm); the mask is not aligned with the image"
        )


def write_nifti(path: Path | str, array: np.ndarray, affine: np.ndarray, kind: str) -> None:
    """Write ``array`` ``(I, J, K)`` with ``affine`` (4, 4) voxel -> RAS mm to ``path`` atomically.

    ``kind="image"``: HU rounded and clipped to int16. ``kind="labels"``: uint8 ids. qform and sform both
    hold the affine (code 1, scanner) so every viewer places the volume the same way.
    """
    path = Path(path)
    suffix = next((s for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{path}: NIfTI file names end in .nii or .nii.gz")
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"{path}: need a 3D array and a (4, 4) affine, got {array.shape} and {affine.shape}")
    if kind == "image":
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{path}: image holds NaN or Inf")
        info = np.iinfo(np.int16)
        data = np.clip(np.round(array), info.min, info.max).astype(np.int16)
    elif kind == "labels":
        if array.size and (array.min() < 0 or array.max() > 255 or np.any(array != np.round(array))):
            raise ValueError(f"{path}: labels must be integers in 0..255 to be stored as uint8")
        data = array.astype(np.uint8)
    else:
        raise ValueError(f'{path}: kind must be "image" or "labels", not {kind!r}')
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
