"""The official Lad ``.npy`` crops: read with the official spacing and the identity orientation.

The mask and structure vector are the shared ``lad_reference`` case (32 x 256 x 256 uint8, Lad's ids);
its image is drawn here from the mask (the reference holds no image).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lad_fast.config import get_preset
from lad_fast.data.geometry import canonical_dhw, hu_to_unit
from lad_fast.data.io import LAD_NPY_SPACING, read_image, read_labels
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.data.layouts import discover
from lad_fast.data.prepare import prepare_dataset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError

ASSUMPTION = r"official Lad \.npy crop carries no affine: read with the identity orientation"


def _image_of(mask: np.ndarray) -> np.ndarray:
    """HU (D, H, W): air, a soft-tissue body (an ellipse on every slice), the pancreas brighter."""
    _, h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)[None].repeat(mask.shape[0], 0)
    hu[mask > 0] = 120.0
    return hu


@pytest.fixture
def lad_folder(shared, tmp_path) -> Path:
    """``Case_00001_image.npy`` (normalised to [-1, 1] as Lad's pipeline does), ``_mask.npy`` and
    ``_topo.npy``."""
    src = tmp_path / "lad_crops"
    src.mkdir()
    for name in ("Case_00001_mask.npy", "Case_00001_topo.npy"):
        shutil.copy(shared / "lad_reference" / name, src / name)
    mask = np.load(src / "Case_00001_mask.npy")
    np.save(src / "Case_00001_image.npy", hu_to_unit(_image_of(mask), (-1000.0, 400.0)))
    return src


def test_lad_crops_are_read_with_the_official_spacing_and_identity_orientation(lad_folder):
    mask = np.load(lad_folder / "Case_00001_mask.npy")
    with pytest.warns(UserWarning, match=ASSUMPTION):
        labels = read_labels(lad_folder / "Case_00001_mask.npy")
    assert labels.spacing == LAD_NPY_SPACING  # the file's axes are (D, H, W)
    dhw, affine = canonical_dhw(labels)
    np.testing.assert_array_equal(dhw, mask)  # identity: the array is already (D, H, W)
    # d steps 2.3 mm superior (z), h 1.6 mm anterior (y), w 1.6 mm toward the right (x)
    np.testing.assert_array_equal(affine[:3, :3], [[0, 0, 1.6], [0, 1.6, 0], [2.3, 0, 0]])
    with pytest.warns(UserWarning, match=ASSUMPTION):
        image = read_image(lad_folder / "Case_00001_image.npy")
    hu, _ = canonical_dhw(image)
    np.testing.assert_allclose(hu, _image_of(mask), atol=1e-3)  # [-1, 1] read back as HU
    np.save(lad_folder / "hu.npy", _image_of(mask))
    with pytest.warns(UserWarning, match=ASSUMPTION):
        np.testing.assert_array_equal(canonical_dhw(read_image(lad_folder / "hu.npy"))[0], _image_of(mask))


def test_prepared_lad_crop_keeps_the_official_mask_and_structure_vector(lad_folder, tmp_path):
    layout, cases = discover(lad_folder)
    assert layout == "flat" and len(cases) == 1  # the _topo.npy vector is not a volume
    assert (cases[0].case_id, cases[0].image.name, cases[0].mask.name, cases[0].vocabulary) == (
        "Case_00001",
        "Case_00001_image.npy",
        "Case_00001_mask.npy",
        "lad",
    )
    with pytest.warns(UserWarning, match=ASSUMPTION):
        prepare_dataset(lad_folder, tmp_path / "out", get_preset("lad"))
    item = PreparedDataset(tmp_path / "out")[0]
    official = np.load(lad_folder / "Case_00001_mask.npy")
    lut = np.array([0, CANONICAL_ID["pancreas"], CANONICAL_ID["pancreatic_lesion"]], np.uint8)
    np.testing.assert_array_equal(item["mask"], lut[official])  # no resampling, no shift
    np.testing.assert_array_equal(item["structure"], np.load(lad_folder / "Case_00001_topo.npy"))
    image = np.load(lad_folder / "Case_00001_image.npy")
    np.testing.assert_allclose(np.asarray(item["image"], np.float32), image, atol=1e-3)  # float16 storage


def test_files_that_are_not_lad_crops_are_refused_by_name(lad_folder):
    with pytest.raises(
        InputError, match=r"Case_00001_topo\.npy: array has shape \(192,\); a Lad crop is one 3D"
    ):
        read_image(lad_folder / "Case_00001_topo.npy")
    np.save(lad_folder / "objects.npy", np.array([{"a": 1}] * 8, dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"objects\.npy: cannot read this \.npy file"):
        read_labels(lad_folder / "objects.npy")
    np.save(lad_folder / "fractions.npy", np.full((2, 3, 4), 0.5))
    with pytest.warns(UserWarning, match=ASSUMPTION):
        with pytest.raises(InputError, match=r"fractions\.npy: label map holds non-integer values"):
            read_labels(lad_folder / "fractions.npy")
