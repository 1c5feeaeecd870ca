"""Predicted masks for cases prepared without one (``predict-masks``, ``prepare --segmenter``), on real
CT: the segmenter runs over the whole height of the source and the slice window is chosen again from its
prediction, as ``import-masks`` does with an external mask.

The case is the shared TotalSegmentator example CT with 70 reflected slices below it (as in
``tests/data/test_masks_later.py``): its centred window holds no pancreas. The segmenter is an oracle
that returns the true labels of whichever window of the column it is shown, so the predicted-mask route
must give exactly the arrays of preparing image and mask together.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lad_fast.config import config_to_dict, get_preset
from lad_fast.data.geometry import hu_to_unit
from lad_fast.data.io import read_labels
from lad_fast.data.labels import CANONICAL_ID, to_canonical
from lad_fast.data.masks import EmptyMaskWarning, source_column
from lad_fast.data.prepare import prepare_dataset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.train import segmenter as seg

LAD = get_preset("lad")
PAD = 70
PANCREAS = CANONICAL_ID["pancreas"]


@pytest.fixture(scope="module")
def tall(tmp_path_factory, shared) -> Path:
    """``P_both`` (image and mask prepared together), ``P_image`` (image only) and ``ext/`` (the mask)."""
    root = tmp_path_factory.mktemp("tall")
    ct = nib.load(shared / "totalseg_example" / "ct.nii.gz")
    labels = nib.load(shared / "totalseg_example" / "seg.nii.gz")
    hu = np.pad(np.asarray(ct.dataobj), ((0, 0), (0, 0), (PAD, 0)), mode="reflect")
    ids = np.pad(np.asarray(labels.dataobj), ((0, 0), (0, 0), (PAD, 0)))
    affine = ct.affine.copy()
    affine[:3, 3] -= PAD * affine[:3, 2]
    for folder in ("both/images", "both/masks", "image_only/images", "ext"):
        (root / folder).mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu, affine), root / "both" / "images" / "abdomen.nii.gz")
    nib.save(nib.Nifti1Image(ids, affine), root / "both" / "masks" / "abdomen.nii.gz")
    (root / "both" / "labels.json").write_text(json.dumps({"vocabulary": "totalseg"}))
    shutil.copy(root / "both" / "images" / "abdomen.nii.gz", root / "image_only" / "images")
    shutil.copy(root / "both" / "masks" / "abdomen.nii.gz", root / "ext" / "abdomen.nii.gz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_QUIET", "1")
        prepare_dataset(root / "both", root / "P_both", LAD)
        prepare_dataset(root / "image_only", root / "P_image", LAD)
    return root


class ColumnOracle(torch.nn.Module):
    """A segmenter that returns the labels of the column window equal to its input (B, 1, D, H, W)."""

    def __init__(self, unit: np.ndarray, mask: np.ndarray):
        super().__init__()
        self.unit, self.mask, self.shown = unit, mask, []

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        depth, out = x.shape[2], []
        for volume in x[:, 0].numpy():
            start = next(
                s
                for s in range(len(self.unit) - depth + 1)
                if np.array_equal(self.unit[s : s + depth], volume)
            )
            self.shown.append(start)
            out.append(self.mask[start : start + depth])
        return torch.from_numpy(np.stack(out))


def _oracle(tall: Path, drop: tuple[int, ...] = ()) -> ColumnOracle:
    labels = read_labels(tall / "ext" / "abdomen.nii.gz")
    canonical, _ = to_canonical(labels.array, "totalseg", affine=labels.affine)
    column = source_column(PreparedDataset(tall / "P_image"), "abdomen", labels, canonical)
    mask = np.where(np.isin(column.mask, drop), 0, column.mask).astype(np.uint8)
    return ColumnOracle(hu_to_unit(column.hu, LAD.geometry.hu_window), mask)


@pytest.fixture
def unlabelled(tall, tmp_path) -> Path:
    return shutil.copytree(tall / "P_image", tmp_path / "data")


def _use(monkeypatch, oracle: ColumnOracle) -> None:
    monkeypatch.setattr(seg, "load_segmenter", lambda run, device: (oracle, {"config": config_to_dict(LAD)}))


def test_a_predicted_mask_rechooses_the_window_as_preparing_both_together(tall, unlabelled, monkeypatch):
    oracle = _oracle(tall)
    _use(monkeypatch, oracle)
    images_before = PreparedDataset(unlabelled).content_hash(masks=False)
    run = Path("runs/oracle")
    assert seg.predict_masks(run, unlabelled, device="cpu") == ["abdomen"]
    ours, ref = PreparedDataset(unlabelled), PreparedDataset(tall / "P_both")
    for name in ("image", "mask", "structure", "affine"):
        np.testing.assert_array_equal(np.asarray(ours[0][name]), np.asarray(ref[0][name]), err_msg=name)
    entry = ours.entry("abdomen")
    assert entry["window"] == "later mask" and entry["mask_source"] == f"predicted:{run}"
    assert entry["crop"] == ref.entry("abdomen")["crop"] and entry["crop"]["start"][0] > 0
    assert (np.asarray(ours[0]["mask"]) == PANCREAS).any()
    assert ours.content_hash(masks=False) != images_before  # re-cropped: why it comes before phase 1
    # every slice of the column was seen, in windows of the preset depth
    depth, total = LAD.geometry.shape[0], len(oracle.unit)
    seen = np.zeros(total, dtype=bool)
    for s in oracle.shown:
        seen[s : s + depth] = True
    assert seen.all() and total > 2 * depth


def test_a_prediction_without_the_window_organs_is_refused_kept_going_past_or_written(
    tall, unlabelled, monkeypatch
):
    """Organs over the column but no pancreas: the window falls back to the centred one, where the
    prediction holds no organ at all, yet the message names the window organs: organs are looked for over
    the whole column first, not in the window that the missing pancreas chose."""
    _use(monkeypatch, _oracle(tall, drop=(PANCREAS,)))
    before = (unlabelled / "index.json").read_bytes()
    images = PreparedDataset(unlabelled).content_hash(masks=False)
    refused = (
        "the segmenter of runs/oracle predicted none of the organs the slice window is chosen by (pancreas, "
        "pancreatic_lesion) inside that window for 1 of 1 case(s) (abdomen); they keep no mask; "
    )
    allow = f"`lad-fast predict-masks {unlabelled} --run runs/oracle --allow-empty`"
    with pytest.raises(InputError) as e:
        seg.predict_masks(Path("runs/oracle"), unlabelled, device="cpu")
    assert str(e.value).startswith(refused) and str(e.value).endswith(allow)
    assert (unlabelled / "index.json").read_bytes() == before

    with pytest.warns(UserWarning, match=re.escape(refused)):  # the main job: named, not stopped
        assert seg.predict_masks(Path("runs/oracle"), unlabelled, device="cpu", keep_going=True) == []
    assert (unlabelled / "index.json").read_bytes() == before  # window, image: untouched
    assert PreparedDataset(unlabelled).content_hash(masks=False) == images

    # asked for: the organs found lie outside the centred window, so the mask written there is empty
    with pytest.warns(
        EmptyMaskWarning,
        match=r"abdomen \(predicted:runs/oracle\): mask is empty on the prepared "
        r"grid \(no organ at all\); written anyway \(--allow-empty\)",
    ):
        written = seg.predict_masks(Path("runs/oracle"), unlabelled, device="cpu", allow_empty=True)
    entry = PreparedDataset(unlabelled).entry("abdomen")
    assert written == ["abdomen"] and entry["has_mask"] and entry["window"] == "later mask"


def test_a_prediction_without_organs_is_never_written(tall, unlabelled, monkeypatch):
    """All background over the whole height: no abdomen found, written not even with ``allow_empty``."""
    oracle = _oracle(tall)
    oracle.mask = np.zeros_like(oracle.mask)
    _use(monkeypatch, oracle)
    before = (unlabelled / "index.json").read_bytes()
    with pytest.raises(InputError) as e:
        seg.predict_masks(Path("runs/oracle"), unlabelled, device="cpu", allow_empty=True)
    assert str(e.value).startswith(
        "the segmenter of runs/oracle predicted no organ, or organs on fewer than 0.5% of the voxels, "
        "for 1 of 1 case(s) (abdomen); they keep no mask; train the segmenter longer"
    )
    assert "--allow-empty" not in str(e.value)  # it would not help
    assert (unlabelled / "index.json").read_bytes() == before


def test_the_predict_masks_command_refuses_in_one_line_or_writes_with_allow_empty(
    tall, unlabelled, monkeypatch, capsys
):
    from lad_fast.cli.app import main

    _use(monkeypatch, _oracle(tall, drop=(PANCREAS,)))
    args = ["predict-masks", str(unlabelled), "--run", str(unlabelled.parent / "r"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("lad-fast: error: the segmenter of") and "--allow-empty`" in err
    with pytest.raises(SystemExit) as exit_, pytest.warns(EmptyMaskWarning, match="written anyway"):
        main([*args, "--allow-empty"])
    assert exit_.value.code == 0 and "predicted masks for 1 case(s)" in capsys.readouterr().out


@pytest.mark.parametrize("rows", [[0] * 9 + [6, 7, 0], [5, 0, 0, 0, 0, 0, 0, 4], [7, 6], [3, 3], [0, 0, 0]])
def test_plausible_looks_for_the_best_window_of_the_column(rows):
    """Against a loop over every window; organs on ``rows[k]`` voxels of slice k, 100 voxels a slice."""
    depth, threshold = 4, 0.03  # a window is plausible from 12 organ voxels
    pred = np.zeros((len(rows), 10, 10), dtype=np.uint8)
    for k, n in enumerate(rows):
        pred[k].flat[:n] = 1
    windows = [sum(rows[s : s + depth]) for s in range(max(len(rows) - depth, 0) + 1)]
    assert seg._plausible(pred, depth, threshold) == (max(windows) >= threshold * depth * 100)


class _Sign(torch.nn.Module):
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] > 0).to(torch.uint8)


@pytest.mark.parametrize("total", [5, 16, 40, 48])
def test_predict_column_labels_every_slice_once_in_preset_windows(total):
    """Against the voxel-wise reference of a voxel-wise 'segmenter': shorter columns are padded, the last
    window ends at the last slice."""
    geom = get_preset("tiny").geometry
    hu = np.random.default_rng(total).uniform(-300, 300, (total, 8, 8)).astype(np.float32)
    out = seg.predict_column(_Sign(), hu, geom, "cpu")
    np.testing.assert_array_equal(out, (hu_to_unit(hu, geom.hu_window) > 0).astype(np.uint8))
