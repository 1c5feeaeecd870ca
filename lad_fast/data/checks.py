"""Checks of untrusted input files before (and right after) their voxels are read.

* :func:`nifti_header`: shape and affine from a NIfTI header, with the claimed data size checked against
  the file (:func:`check_nifti_size`) and a voxel cap (:data:`MAX_VOXELS`), so a 77-byte ``.nii.gz``
  claiming 4000^3 voxels is refused before anything is allocated.
* :func:`check_grid_size`: the same cap on a grid about to be allocated (a resampling target: 10^3
  voxels at 1000 mm spacing become 6667^3 at 1.5 mm).
* :func:`refuse_label_map`: a CT image that is in fact a label map (few integer values, no air).
* :func:`check_case_folder`: a prepared ``cases/<id>/`` that holds files prepare did not write.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.errors import InputError, OutputExistsError

# 2^30 voxels: 4 GiB as float32, over 3x a 512 x 512 x 1200 whole-body CT. Larger inputs are refused
# before reading instead of exhausting memory; crop or downsample them first.
MAX_VOXELS = 1 << 30
# Deflate cannot compress better than about 1032:1, so a .nii.gz claiming more data than that is lying.
MAX_GZIP_RATIO = 1032
# A label map given as CT: at most this many distinct values, all whole numbers, and nothing as dark as
# air. Real CT holds air (-1000 HU, or 0 raw without intercept but then hundreds of distinct values).
LABEL_MAP_MAX_VALUES = 256
AIR_HU = -500.0


def check_grid_size(shape: tuple[int, ...], source: str, what: str = "volume") -> None:
    """InputError when a grid of ``shape`` would exceed :data:`MAX_VOXELS` voxels."""
    n = math.prod(float(s) for s in shape)  # floats: a header's absurd spacing may give inf
    if not n <= MAX_VOXELS:
        shown = tuple(int(s) if math.isfinite(float(s)) else float(s) for s in shape)
        raise InputError(
            f"{source}: the {what} would be {shown} = {n:.3g} voxels, more than "
            f"lad-fast reads ({MAX_VOXELS:.3g}); check the header's dimensions and voxel spacing, or crop "
            "or downsample the scan first"
        )


def check_nifti_size(path: Path, img: Any) -> None:
    """Refuse a NIfTI whose header claims more voxel data than the file can hold (uncompressed: the
    file size; ``.gz``: :data:`MAX_GZIP_RATIO` times it) or more than :data:`MAX_VOXELS` voxels."""
    shape = tuple(int(n) for n in img.shape)
    check_grid_size(shape, str(path))
    claimed = math.prod(shape) * np.dtype(img.get_data_dtype()).itemsize
    offset = int(getattr(img.dataobj, "offset", 0) or 0)  # where the voxels start (the header's vox_offset)
    size = path.stat().st_size
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    limit = size * MAX_GZIP_RATIO + (1 << 16) if compressed else size - offset
    if claimed > limit:
        how = "even at deflate's best ratio" if compressed else f"after its {offset}-byte header"
        raise InputError(
            f"{path}: the header claims {shape} voxels ({claimed:.3g} bytes), but the {size}-byte file "
            f"cannot hold them {how}; the file is truncated or its header is wrong"
        )


def nifti_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) from the header of the NIfTI file ``path`` without reading voxels.

    InputError for an unreadable header, a shape that is not one 3D volume, a singular affine, or a
    claimed size the file cannot hold (:func:`check_nifti_size`).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for foreign or broken headers; name the file
        raise InputError(f"{path}: cannot read this NIfTI header, the file is corrupt ({exc})") from None
    check_nifti_size(path, img)
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape = shape[:3]  # the readers squeeze trailing unit dimensions too
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(
            f"{path}: volume has shape {shape}; lad-fast needs one 3D volume with several slices"
        )
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(
            f"{path}: the voxel-to-world affine is singular or not finite; fix the file's header"
        )
    return shape, affine


def refuse_label_map(array: np.ndarray, source: str) -> None:
    """InputError when a CT image ``array`` (HU) looks like a label map: whole numbers only, at most
    :data:`LABEL_MAP_MAX_VALUES` distinct values and nothing as dark as air (:data:`AIR_HU`)."""
    if array.size == 0 or float(array.min()) < AIR_HU:
        return  # air: a CT (this test alone rules out almost every real scan at once)
    sample = array.reshape(-1)[:: max(1, array.size // 65536)]  # cheap first look before the full pass
    if len(np.unique(sample)) > LABEL_MAP_MAX_VALUES or np.any(sample != np.round(sample)):
        return
    values = np.unique(array)
    if len(values) > LABEL_MAP_MAX_VALUES or np.any(values != np.round(values)):
        return
    raise InputError(
        f"{source}: looks like a label map, not a CT image ({len(values)} distinct whole values "
        f"{values.min():g}..{values.max():g}, no air at -1000 HU); pass the CT scan as the image and this "
        "file as its mask (a masks/, labelsTr/ or segmentations/ folder beside the images; "
        "--vocabulary or --label-map for its ids)"
    )


def check_case_folder(folder: Path, files: tuple[str, ...]) -> None:
    """Refuse (even with ``--force``) a prepared case folder that holds anything but ``files`` and the
    temporaries of their atomic writes: prepare replaces a case folder whole, which would delete it."""
    from lad_fast.utils.atomic import temporary_target

    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink():
        foreign = sorted(
            p.name for p in folder.iterdir() if p.name not in files and temporary_target(p.name) not in files
        )
    else:
        foreign = ["(a file or link in the folder's place)"]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{folder}: holds {shown}, which prepare did not write; prepare replaces a case folder whole, "
            "so move them out first (--force never deletes files lad-fast did not write)"
        )


__all__ = [
    "AIR_HU",
    "MAX_VOXELS",
    "check_case_folder",
    "check_grid_size",
    "check_nifti_size",
    "nifti_header",
    "refuse_label_map",
]
