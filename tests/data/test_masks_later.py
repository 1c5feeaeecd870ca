"""Masks that arrive after ``prepare``, on real CT: the slice window is chosen again from the mask.

The case is the shared TotalSegmentator example CT (122 x 101 x 30 voxels at 3 mm, abdomen with the
pancreas) with 70 reflected slices below it, so that the whole scan reaches far below the organs, as a
full abdominal CT reaches the pelvis: the centred window of the case prepared without a mask holds
no pancreas.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lad_fast.config import get_preset
from lad_fast.data.io import read_labels
from lad_fast.data.labels import CANONICAL_ID, to_canonical
from lad_fast.data.masks import import_masks, mask_onto_case
from lad_fast.data.prepare import prepare_dataset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError

LAD = get_preset("lad")
PAD = 70  # slices added below the example's 30 (3 mm each): 300 mm in all, the organs in the top 90 mm
PANCREAS = CANONICAL_ID["pancreas"]


@pytest.fixture(scope="module")
def tall(tmp_path_factory, shared) -> Path:
    """``both/`` (image and mask), ``image_only/`` and ``ext/`` (the mask, to import), each of the one
    tall case ``abdomen``; ``P_both`` prepared from ``both/`` and ``P_image`` from ``image_only/``."""
    root = tmp_path_factory.mktemp("tall")
    ct = nib.load(shared / "totalseg_example" / "ct.nii.gz")
    seg = nib.load(shared / "totalseg_example" / "seg.nii.gz")
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S") and ct.shape == seg.shape == (122, 101, 30)
    hu = np.pad(np.asarray(ct.dataobj), ((0, 0), (0, 0), (PAD, 0)), mode="reflect")  # real tissue below
    labels = np.pad(np.asarray(seg.dataobj), ((0, 0), (0, 0), (PAD, 0)))
    affine = ct.affine.copy()
    affine[:3, 3] -= PAD * affine[:3, 2]  # the first voxel moves PAD slices down; the rest stays put
    for folder in ("both/images", "both/masks", "image_only/images", "ext"):
        (root / folder).mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu, affine), root / "both" / "images" / "abdomen.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), root / "both" / "masks" / "abdomen.nii.gz")
    (root / "both" / "labels.json").write_text(json.dumps({"vocabulary": "totalseg"}))
    shutil.copy(
        root / "both" / "images" / "abdomen.nii.gz", root / "image_only" / "images" / "abdomen.nii.gz"
    )
    shutil.copy(root / "both" / "masks" / "abdomen.nii.gz", root / "ext" / "abdomen.nii.gz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_QUIET", "1")
        prepare_dataset(root / "both", root / "P_both", LAD)
        prepare_dataset(root / "image_only", root / "P_image", LAD)
    return root


@pytest.fixture
def unlabelled(tall, tmp_path) -> Path:
    return shutil.copytree(tall / "P_image", tmp_path / "data")


def test_the_centred_window_misses_the_organs(tall):
    """The premise: cropped to the window prepare chose without a mask, the mask holds no pancreas."""
    ds = PreparedDataset(tall / "P_image")
    entry = ds.entry("abdomen")
    assert entry["window"] == "centre" and not entry["has_mask"]
    labels = read_labels(tall / "ext" / "abdomen.nii.gz")
    canonical, _ = to_canonical(labels.array, "totalseg", affine=labels.affine)
    fixed = mask_onto_case(canonical, labels.affine, entry, ds.geometry, "ext/abdomen.nii.gz")
    assert not (fixed == PANCREAS).any()
    both = PreparedDataset(tall / "P_both")
    assert both.entry("abdomen")["window"] == "mask"
    assert (np.asarray(both[0]["mask"]) == PANCREAS).any(axis=(1, 2)).sum() >= 16  # most of the 32 slices


def test_importing_the_mask_gives_the_arrays_of_preparing_both_together(tall, unlabelled):
    images_before = PreparedDataset(unlabelled).content_hash(masks=False)
    assert import_masks(unlabelled, tall / "ext") == ["abdomen"]
    ours, ref = PreparedDataset(unlabelled), PreparedDataset(tall / "P_both")
    for name in ("image", "mask", "structure", "affine"):
        np.testing.assert_array_equal(np.asarray(ours[0][name]), np.asarray(ref[0][name]), err_msg=name)
    entry = ours.entry("abdomen")
    assert entry["crop"] == ref.entry("abdomen")["crop"] and entry["crop"]["start"][0] > 0
    assert (
        entry["window"] == "later mask"
        and entry["mask_source"] == f"external:{tall / 'ext' / 'abdomen.nii.gz'}"
    )
    assert entry["has_mask"] and entry["mask_hash"] == ref.entry("abdomen")["mask_hash"]
    # The image is another crop of the same sources: its identity in the data hash changed with it.
    assert ours.content_hash(masks=False) != images_before
    assert not any(p.name.startswith(".") for p in unlabelled.rglob("*"))  # no temporaries left

    # A rerun of prepare over the same sources keeps the case as it is now.
    index = prepare_dataset(tall / "image_only", unlabelled, LAD)
    assert index["cases"][0] == entry
    np.testing.assert_array_equal(PreparedDataset(unlabelled)[0]["mask"], ref[0]["mask"])


def test_the_source_image_must_be_there_and_unchanged(tall, unlabelled, tmp_path):
    source = Path(PreparedDataset(unlabelled).entry("abdomen")["image_source"])
    moved = tmp_path / "src"
    shutil.copytree(tall / "image_only", moved)
    index = json.loads((unlabelled / "index.json").read_text())
    index["cases"][0]["image_source"] = str(moved / "images" / "abdomen.nii.gz")
    (unlabelled / "index.json").write_text(json.dumps(index))
    (moved / "images" / "abdomen.nii.gz").unlink()
    with pytest.raises(
        InputError,
        match=r"case abdomen was prepared without a mask, so its slice window is chosen again .* needs its "
        r"source image .*abdomen\.nii\.gz; it is not there any more: put it back there, or prepare the case "
        r"together",
    ):
        import_masks(unlabelled, tall / "ext")
    shutil.copy(
        tall / "both" / "masks" / "abdomen.nii.gz", moved / "images" / "abdomen.nii.gz"
    )  # another file
    with pytest.raises(
        InputError, match=r"it changed since prepare \(its content hash differs\): restore it"
    ):
        import_masks(unlabelled, tall / "ext")
    assert not PreparedDataset(unlabelled).entry("abdomen")["has_mask"]
    assert source.is_file()


def test_a_failed_rewrite_leaves_the_old_case_listed(tall, unlabelled, monkeypatch):
    before = (unlabelled / "index.json").read_text()
    image = np.load(unlabelled / "cases" / "abdomen" / "image.npy")
    real_save = np.save

    def failing_save(path, array, *args, **kwargs):
        if array.dtype == np.int64:  # structure.npy, the last file of the new folder
            raise OSError("disk went away")
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk went away"):
        import_masks(unlabelled, tall / "ext")
    assert (unlabelled / "index.json").read_text() == before
    np.testing.assert_array_equal(np.load(unlabelled / "cases" / "abdomen" / "image.npy"), image)
    assert sorted(p.name for p in (unlabelled / "cases").iterdir()) == ["abdomen"]
    assert sorted(p.name for p in (unlabelled / "cases" / "abdomen").iterdir()) == ["image.npy"]
