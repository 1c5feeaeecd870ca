"""PNG previews: panel geometry, display orientation, outlines where the mask is, and write_preview."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lad_fast.preview import PANEL_PX, label_colour, render_grid, render_slices, write_preview


def _volume() -> tuple[np.ndarray, np.ndarray]:
    hu = np.full((8, 40, 40), -1000.0, np.float32)
    hu[:, 5:35, 5:35] = 40.0
    mask = np.zeros(hu.shape, np.uint8)
    mask[2:6, 20:30, 25:35] = 5  # anterior (high H) and patient's right (high W)
    return hu, mask


def _colour_pixels(img: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    return np.argwhere(np.all(np.asarray(img) == colour, axis=-1))


def test_render_slices_size_and_outline_position():
    hu, mask = _volume()
    img = render_slices(hu, mask, spacing=(4.0, 2.0, 2.0), title="t")
    assert img.mode == "RGB"
    # Thin slab: coronal and sagittal stack beside the square axial panel.
    assert PANEL_PX + 12 < img.width < 3 * PANEL_PX and img.height >= PANEL_PX
    px = _colour_pixels(img, label_colour(5))
    assert len(px) > 20
    top = 6 + 18 + 17
    # (row, col) inside the axial panel (the legend swatch below it has the colour too).
    axial = px[(px[:, 1] < PANEL_PX + 6) & (px[:, 0] < top + PANEL_PX)]
    assert len(axial) > 8
    rows = (axial[:, 0] - top) / PANEL_PX
    cols = (axial[:, 1] - 6) / PANEL_PX
    # Anterior up: the organ (H 20..30 of 40) sits in the upper half; patient's right on the viewer's left.
    assert rows.max() < 0.55 and cols.max() < 0.45
    # Without a mask there are no coloured outline pixels.
    plain = render_slices(hu, None, spacing=(4.0, 2.0, 2.0))
    assert len(_colour_pixels(plain, label_colour(5))) == 0


def test_render_slices_aspect_follows_spacing():
    hu, _ = _volume()
    wide = render_slices(hu, None, spacing=(4.0, 1.0, 3.0))
    arr = np.asarray(wide)[6 + 17 :, 6 : 6 + PANEL_PX].max(axis=-1)
    rows, cols = np.nonzero(arr > 100)  # the 40 HU square is bright in the default window
    # 30 voxels at 1 mm (rows) vs 30 voxels at 3 mm (columns): three times wider than tall.
    assert 2.6 < (np.ptp(cols) + 1) / (np.ptp(rows) + 1) < 3.4


def test_render_slices_rejects_bad_input():
    hu, mask = _volume()
    with pytest.raises(ValueError, match=r"needs a 3D \(D, H, W\) volume"):
        render_slices(hu[0], None, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match=r"mask shape \(8, 40, 39\) differs"):
        render_slices(hu, mask[:, :, :39], spacing=(1, 1, 1))
    with pytest.raises(ValueError, match=r"window \(10, 0\) must have low < high"):
        render_slices(hu, None, spacing=(1, 1, 1), window=(10, 0))


def test_render_grid_rows():
    hu, _ = _volume()
    img = render_grid([[hu, hu[3]], [hu * 0]], labels=["input", "recon"])
    assert img.width > 2 * 192 and img.height > 2 * 192
    with pytest.raises(ValueError, match=r"2 labels for 1 rows"):
        render_grid([[hu]], labels=["a", "b"])
    with pytest.raises(ValueError, match=r"at least one row"):
        render_grid([])


def test_write_preview_nifti(tmp_path):
    from lad_fast.data.geometry import dhw_to_nifti
    from lad_fast.data.io import write_nifti
    from lad_fast.errors import InputError

    hu, mask = _volume()
    affine = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])  # (d, h, w) -> RAS
    img_ijk, aff_ijk = dhw_to_nifti(hu, affine)
    lab_ijk, _ = dhw_to_nifti(mask, affine)
    write_nifti(tmp_path / "ct.nii.gz", img_ijk, aff_ijk, kind="image")
    write_nifti(tmp_path / "seg.nii.gz", lab_ijk, aff_ijk, kind="labels")
    out = write_preview(tmp_path / "ct.nii.gz", mask=tmp_path / "seg.nii.gz")
    assert out == tmp_path / "ct.png"
    pic = Image.open(out)
    direct = render_slices(hu, mask, spacing=(4.0, 2.0, 2.0), title="ct.nii.gz")
    assert pic.size == direct.size and np.array_equal(np.asarray(pic.convert("RGB")), np.asarray(direct))
    write_nifti(tmp_path / "small.nii.gz", lab_ijk[:-1], aff_ijk, kind="labels")
    with pytest.raises(InputError, match=r"small.nii.gz: mask shape .* differs from image"):
        write_preview(tmp_path / "ct.nii.gz", out=tmp_path / "x.png", mask=tmp_path / "small.nii.gz")
    assert not (tmp_path / "x.png").exists()
