"""Geometry: from a volume in its file's voxel order to the preset's ``(D, H, W)`` grid, and back.

The steps, in order (Lad's input geometry: docs/lad.md, "Input geometry"):

1. :func:`canonical_dhw`: reorient to RAS (nibabel orientations, no interpolation), then transpose
   ``(i, j, k) -> (k, j, i)`` so indices increase toward (Superior, Anterior, patient's Right).
2. :func:`resample`: to the preset spacing, linear for images and nearest for label maps. The new grid
   keeps the *centre of the field of view*: ``n_new = round(n * s / s_new)`` voxels are laid out
   symmetrically about the old grid's centre, so interpolation blur and rounding are symmetric and the
   affine stays exact (``A_new = A_old @ [diag(s_new / s), offset]``).
3. :func:`window_start` / :func:`crop_or_pad`: along D, the ``depth``-slice window that holds the most
   slices containing any of ``geometry.window_organs`` (Lad: pancreas and lesion), centred on those
   organs among equally good windows and centred on the volume without a mask or organ; H and W are
   cropped or padded about their centre. Padding is air (-1000 HU) for images, 0 for labels, as the
   official code pads. :func:`column_case` does everything but the window (every slice kept), and
   :func:`window_case` chooses it, so a mask that arrives after ``prepare`` can choose it again.
4. :func:`hu_to_unit`: clip HU to the preset window and map it linearly to [-1, 1].

Every step updates a ``(4, 4)`` affine mapping ``(d, h, w)`` voxel indices to RAS world mm, so a prepared
case written back with :func:`dhw_to_nifti` overlays its source in any viewer.

The window rule follows the paper's description (a 32-slice window where the pancreas is); the official
dataset code was not available to compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lad_fast.config import GeometryConfig
from lad_fast.data.checks import check_grid_size
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.data.volume import Volume
from lad_fast.errors import InputError

AIR_HU = -1000.0
AXIS_NAMES = ("D (inferior-superior)", "H (posterior-anterior)", "W (left-right)")

# (D, H, W) <-> RAS (x, y, z): D is z, H is y, W is x.
_DHW_TO_RAS = (2, 1, 0)


@dataclass
class PreparedCase:
    """One case on the preset grid.

    ``image`` (D, H, W) float32 in [-1, 1]; ``mask`` (D, H, W) uint8 canonical ids or None; ``affine``
    (4, 4) maps prepared ``(d, h, w)`` indices to RAS mm (it carries the crop's true position);
    ``crop_start`` is the first prepared voxel's index in the resampled grid (negative: padded), so the
    crop box is ``[crop_start, crop_start + shape)`` of a grid of ``resampled_shape``.
    """

    image: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray
    crop_start: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]

    def crop_box(self) -> dict[str, list[int]]:
        """JSON-ready crop box in the resampled grid (``stop`` is exclusive)."""
        start = [int(s) for s in self.crop_start]
        return {
            "start": start,
            "stop": [s + n for s, n in zip(start, self.image.shape, strict=True)],
            "resampled_shape": [int(n) for n in self.resampled_shape],
        }


# ---------------------------------------------------------------------------------------------- orient


def _ras_axes(affine: np.ndarray) -> np.ndarray:
    """``ornt`` of nibabel: per array axis, (RAS axis it follows, +1 or -1)."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise InputError("affine has a degenerate (zero-length or parallel) axis; the header is broken")
    return ornt


def canonical_dhw(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``vol`` to canonical ``(D, H, W)`` = (S, A, R) without interpolation.

    Returns ``(array (D, H, W), affine (4, 4))`` with the affine of the ``(d, h, w)`` grid in RAS mm.
    Oblique scans are reoriented to the closest canonical axes; their affine stays exact (oblique).
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    if vol.array.ndim != 3:
        raise InputError(f"{vol.source}: expected a 3D volume, got shape {tuple(vol.array.shape)}")
    try:
        ornt = _ras_axes(vol.affine)
    except InputError as err:
        raise InputError(f"{vol.source}: {err}") from None
    ras = apply_orientation(vol.array, ornt)
    affine_ras = np.asarray(vol.affine, dtype=np.float64) @ inv_ornt_aff(ornt, vol.array.shape)
    return np.ascontiguousarray(ras.transpose(2, 1, 0)), affine_ras[:, [2, 1, 0, 3]]


def canonical_extent(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shape (3,), spacing (3,))`` along (D, H, W) of a file-order grid, from its header alone."""
    ornt = _ras_axes(affine)
    spacing_ijk = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    shape_dhw = np.zeros(3, dtype=np.int64)
    spacing_dhw = np.zeros(3)
    for axis, (ras_axis, _) in enumerate(ornt):
        dhw_axis = _DHW_TO_RAS[int(ras_axis)]
        shape_dhw[dhw_axis] = shape[axis]
        spacing_dhw[dhw_axis] = spacing_ijk[axis]
    return shape_dhw, spacing_dhw


def check_coverage(shape: tuple[int, ...], affine: np.ndarray, geom: GeometryConfig, source: str) -> None:
    """Raise :class:`InputError` when the volume covers less than ``geom.min_coverage`` of the preset's
    field of view along any axis. ``shape`` and ``affine`` are the file's (header only, no voxels)."""
    shape_dhw, spacing_dhw = canonical_extent(shape, affine)
    # the grid prepare resamples onto, before any memory is asked for it
    check_grid_size(np.ceil(shape_dhw * spacing_dhw / np.asarray(geom.spacing)), source, "volume resampled")
    for axis in range(3):
        covered = float(shape_dhw[axis] * spacing_dhw[axis])
        needed = minimum_extent(geom, axis)
        if covered < needed - 1e-6:
            fov = geom.shape[axis] * geom.spacing[axis]
            raise InputError(
                f"{source}: too small along axis {AXIS_NAMES[axis]}: covers {covered:.1f} mm, needs at least "
                f"{needed:.1f} mm ({geom.min_coverage:g} of the preset's {fov:.1f} mm field of view); "
                + _smaller_presets(covered, axis)
            )


def minimum_extent(geom: GeometryConfig, axis: int) -> float:
    """The least extent in mm along ``axis`` (0: D, 1: H, 2: W) that ``geom`` prepares: ``min_coverage``
    of its field of view."""
    return geom.min_coverage * geom.shape[axis] * geom.spacing[axis]


def _smaller_presets(covered: float, axis: int) -> str:
    """What to do about a scan covering ``covered`` mm along ``axis``: a preset that accepts it, or that
    none does (then a smaller field of view is no way out)."""
    from lad_fast.config import PRESETS, get_preset

    needs = {name: minimum_extent(get_preset(name).geometry, axis) for name in PRESETS}
    fitting = sorted(name for name, need in needs.items() if covered >= need - 1e-6)
    if fitting:
        return f"prepare it with --preset {fitting[0]}, which needs {needs[fitting[0]]:.1f} mm"
    return (
        f"no preset fits it (the least any preset needs along this axis is {min(needs.values()):.1f} mm): "
        "use a scan that covers more of the body, or leave this case out (prepare --skip-invalid "
        "prepares the other cases and reports it)"
    )


# -------------------------------------------------------------------------------------------- resample


def resampled_grid(
    shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The grid :func:`resample` produces: ``(shape, affine, (zoom, offset))``.

    ``zoom`` (3,) and ``offset`` (3,) map a new index ``p`` to the old continuous index ``zoom * p + offset``;
    the field of view's centre is kept.
    """
    old = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    new = np.asarray(spacing, dtype=np.float64)
    n_old = np.asarray(shape[:3], dtype=np.float64)
    n_new = np.maximum(1, np.rint(n_old * old / new)).astype(np.int64)
    zoom = new / old
    offset = (n_old - 1) / 2 - zoom * (n_new - 1) / 2
    step = np.eye(4)
    step[:3, :3] = np.diag(zoom)
    step[:3, 3] = offset
    return tuple(int(n) for n in n_new), np.asarray(affine, dtype=np.float64) @ step, np.stack([zoom, offset])


def resample(
    array: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a ``(D, H, W)`` array to ``spacing`` mm (``order`` 1: linear, for images; 0: nearest, for
    label maps). Returns ``(array (D', H', W'), affine (4, 4))``; see :func:`resampled_grid`."""
    shape, new_affine, (zoom, offset) = resampled_grid(array.shape, affine, spacing)
    old = tuple(round(float(v), 3) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))
    check_grid_size(shape, f"a {array.shape} volume of {old} mm voxels", "resampled volume")
    if shape == array.shape and np.allclose(zoom, 1) and np.allclose(offset, 0):
        return array, new_affine
    # Edge voxels of the new grid may sit up to half a voxel beyond the old one: repeat the edge there.
    out = ndimage.affine_transform(
        array, zoom, offset=offset, output_shape=shape, order=order, mode="nearest", prefilter=False
    )
    return out, new_affine


# ------------------------------------------------------------------------------------------ crop / pad


def window_start(n: int, depth: int, mask: np.ndarray | None = None, organ_ids: tuple[int, ...] = ()) -> int:
    """First slice (along D) of the ``depth``-slice window of an ``n``-slice volume that holds the most
    slices with any organ of ``organ_ids``; ``mask`` is ``(n, H, W)`` or None.

    Among equally good windows the one centred on the organs' slice range wins (so the organ keeps a
    margin above and below); without a mask or organ the window is centred. A negative start means the
    volume is shorter than ``depth`` and is padded (centred).
    """
    if mask is None or n <= depth or not organ_ids:
        return (n - depth) // 2
    hit = np.isin(mask, organ_ids).any(axis=(1, 2))
    if not hit.any():
        return (n - depth) // 2
    counts = np.convolve(hit.astype(np.int64), np.ones(depth, dtype=np.int64), mode="valid")  # (n-depth+1,)
    best = np.flatnonzero(counts == counts.max())
    slices = np.flatnonzero(hit)
    organ_centre = (slices[0] + slices[-1]) / 2
    # A window's centre is start + (depth - 1) / 2; equal distances resolve to the lower start.
    return int(best[np.argmin(np.abs(best + (depth - 1) / 2 - organ_centre))])


def crop_or_pad(array: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...], fill: float) -> np.ndarray:
    """Cut ``array[start : start + shape]`` per axis; positions outside ``array`` hold ``fill``."""
    out = np.full(shape, fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, size in zip(start, array.shape, shape, strict=True):
        lo, hi = max(s, 0), min(s + size, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def shifted_affine(affine: np.ndarray, start: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid whose voxel 0 is voxel ``start`` of ``affine``'s grid."""
    step = np.eye(4)
    step[:3, 3] = start
    return np.asarray(affine, dtype=np.float64) @ step


# ------------------------------------------------------------------------------------------- intensity


def hu_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window`` = (lo, hi) and map it linearly to [-1, 1] (float32)."""
    lo, hi = window
    hu = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    return (hu - lo) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)


def unit_to_hu(unit: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` on [-1, 1] (float32 HU; values outside are clipped first)."""
    lo, hi = window
    unit = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
    return (unit + np.float32(1.0)) * np.float32((hi - lo) / 2.0) + np.float32(lo)


# ------------------------------------------------------------------------------------------ the whole


@dataclass
class ColumnCase:
    """One case at the preset spacing with H and W already cropped or padded to the preset and every
    slice kept: what the slice window is chosen from (:func:`window_case`).

    ``hu`` (D', H, W) float32 HU; ``mask`` (D', H, W) uint8 canonical ids or None; ``resampled_affine``
    (4, 4) of the whole resampled grid of ``resampled_shape`` (D', H', W'); ``hw_start`` the column's
    first (h, w) voxel in that grid (negative: padded).
    """

    hu: np.ndarray
    mask: np.ndarray | None
    resampled_affine: np.ndarray
    resampled_shape: tuple[int, int, int]
    hw_start: tuple[int, int]


def window_organ_ids(geom: GeometryConfig) -> tuple[int, ...]:
    """Canonical ids of ``geom.window_organs``, the organs the slice window is chosen by."""
    return tuple(CANONICAL_ID[name] for name in geom.window_organs)


def column_case(
    image: Volume,
    labels: Volume | None,
    geom: GeometryConfig,
    label_array: np.ndarray | None = None,
) -> ColumnCase:
    """Reorient and resample one case, and crop or pad H and W about their centre (see
    :func:`prepare_case` for the arguments). The slice window is not chosen yet."""
    check_coverage(image.shape, image.affine, geom, image.source)
    hu, affine = canonical_dhw(image)
    hu, res_affine = resample(hu.astype(np.float32, copy=False), affine, geom.spacing, order=1)

    mask = None
    if labels is not None:
        ids = labels.array if label_array is None else label_array
        if ids.shape != labels.array.shape:
            raise InputError(
                f"{labels.source}: label_array has shape {ids.shape}, the label map {labels.array.shape}"
            )
        ids, _ = canonical_dhw(Volume(np.asarray(ids, dtype=np.uint8), labels.affine, labels.source))
        mask, _ = resample(ids, affine, geom.spacing, order=0)
        if mask.shape != hu.shape:  # only if the caller skipped check_pair
            raise InputError(f"{labels.source}: label map grid differs from the image {image.source}")

    hw = ((hu.shape[1] - geom.shape[1]) // 2, (hu.shape[2] - geom.shape[2]) // 2)
    column = (hu.shape[0], *geom.shape[1:])
    return ColumnCase(
        hu=crop_or_pad(hu, (0, *hw), column, AIR_HU),
        mask=None if mask is None else crop_or_pad(mask, (0, *hw), column, 0),
        resampled_affine=res_affine,
        resampled_shape=tuple(int(n) for n in hu.shape),
        hw_start=hw,
    )


def window_case(column: ColumnCase, geom: GeometryConfig) -> PreparedCase:
    """Choose the slice window of ``column`` (:func:`window_start`, from its mask when it has one), cut
    image and mask to it and map HU to [-1, 1]. Returns a :class:`PreparedCase` of ``geom.shape``."""
    d0 = window_start(column.hu.shape[0], geom.shape[0], column.mask, window_organ_ids(geom))
    start = (d0, *column.hw_start)
    return PreparedCase(
        image=hu_to_unit(crop_or_pad(column.hu, (d0, 0, 0), geom.shape, AIR_HU), geom.hu_window),
        mask=None if column.mask is None else crop_or_pad(column.mask, (d0, 0, 0), geom.shape, 0),
        affine=shifted_affine(column.resampled_affine, start),
        crop_start=start,
        resampled_shape=column.resampled_shape,
    )


def prepare_case(
    image: Volume,
    labels: Volume | None,
    geom: GeometryConfig,
    label_array: np.ndarray | None = None,
) -> PreparedCase:
    """Bring one case onto the preset grid.

    ``image``: float HU in file voxel order. ``labels``: the label map's volume (same grid as the image:
    the caller checks the pair) whose ids are already *canonical*; ``label_array`` (same shape), when
    given, replaces ``labels.array``: the caller maps source ids with ``data.labels.to_canonical`` in file
    order (the AbdomenCT-1K kidney split needs the file's affine) and passes the result here, so nearest
    resampling only ever sees canonical ids. Returns a :class:`PreparedCase` of ``geom.shape``.
    """
    return window_case(column_case(image, labels, geom, label_array), geom)


# ------------------------------------------------------------------------------------- back to NIfTI


def dhw_to_nifti(array_dhw: np.ndarray, affine_dhw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(D, H, W)`` array and its affine -> ``(W, H, D)`` = ``(i, j, k)`` array and the NIfTI affine whose
    columns are the x, y, z steps (RAS-oriented file for a canonical grid). Exact; its own inverse."""
    affine = np.asarray(affine_dhw, dtype=np.float64)[:, [2, 1, 0, 3]]
    return np.ascontiguousarray(np.asarray(array_dhw).transpose(2, 1, 0)), affine


def nifti_to_dhw(array_ijk: np.ndarray, affine_ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`dhw_to_nifti` (for a file that :func:`dhw_to_nifti` wrote)."""
    return dhw_to_nifti(array_ijk, affine_ijk)
