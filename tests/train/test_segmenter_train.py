from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import TruthPredictions, rewrite_meta

from lad_fast.conditioning.conditions import structure_condition
from lad_fast.config import SegmenterConfig, get_preset
from lad_fast.data.labels import CANONICAL_ID, CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import CheckpointError, InputError
from lad_fast.runs.loading import load_segmenter
from lad_fast.runs.rundir import RunDir
from lad_fast.train.data import PreparedBatches
from lad_fast.train.segmenter import (
    SHIFT_VOXELS,
    SegmenterBatches,
    _shift,
    evaluate_segmenter,
    labelled_split,
    predict_masks,
    render_prediction,
    train_segmenter,
)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """A prepared dataset of 4 tiny phantoms (3 train, 1 held out), made once for this module."""
    from lad_fast.data.cache import phantom_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("LAD_FAST_QUIET", "1")
        return phantom_dataset("tiny", n=4)


@pytest.fixture
def data(phantoms, tmp_path):
    """A private copy: the tests below write masks into it."""
    return shutil.copytree(phantoms, tmp_path / "data")


def tiny_cfg(steps: int = 2):
    cfg = get_preset("tiny")
    return replace(
        cfg,
        segmenter=SegmenterConfig(channels=(8, 16), groups=4),
        segmenter_train=replace(cfg.segmenter_train, steps=steps, batch_size=2, checkpoint_every=100),
    )


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "seg"
    result = train_segmenter(run, tiny_cfg(), data=phantoms, device="cpu")
    return run, result


def _drop_mask(data, case: int) -> str:
    """Make case ``case`` unlabelled, as prepare writes a case without a mask."""
    index = json.loads((data / "index.json").read_text())
    entry = index["cases"][case]
    entry["has_mask"], entry["mask_source"], entry["vocabulary"] = False, None, None
    for name in ("mask.npy", "structure.npy"):
        (data / "cases" / entry["id"] / name).unlink()
    (data / "index.json").write_text(json.dumps(index))
    return entry["id"]


# ------------------------------------------------------------------------------------------- training


def test_training_checkpoints_the_vocabulary_and_logs_held_out_dice(trained, phantoms):
    run, result = trained
    assert result.step == 2 and result.checkpoint.name == "step-00000002"
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["model"] == "segmenter" and meta["preset"] == "tiny"
    assert meta["extra"]["organs"] == list(CANONICAL_ORGANS)
    assert meta["extra"]["train_cases"] == 3 and meta["extra"]["held_out_cases"] == ["phantom_0_0003"]
    evals = [r for r in RunDir(run).read_log("segmenter") if r.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["held_out"] and evals[0]["cases"] == 1
    assert {"liver", "spleen", "kidney_right", "kidney_left", "pancreas"} <= set(evals[0]["dice"])
    assert all(0.0 <= v <= 1.0 for v in evals[0]["dice"].values())


def test_load_segmenter_returns_the_trained_weights_in_eval_mode(trained):
    run, result = trained
    net, meta = load_segmenter(run)
    assert not net.training and net.num_classes == NUM_CLASSES
    assert net.cfg == SegmenterConfig(channels=(8, 16), groups=4)
    from safetensors.torch import load_file

    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert meta["config"]["preset"] == "tiny" and meta["step"] == 2


def test_a_checkpoint_for_another_vocabulary_is_refused(trained, tmp_path):
    run, result = trained
    copy = shutil.copytree(run, tmp_path / "other")
    meta_path = copy / "segmenter" / result.checkpoint.name / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["extra"]["organs"] = ["background", "pancreas", "pancreatic_lesion"]
    rewrite_meta(meta_path, meta)
    with pytest.raises(CheckpointError, match=r"organ vocabulary \['background', 'pancreas'.*retrain"):
        load_segmenter(copy)


def test_a_run_without_a_segmenter_is_a_clear_error(tmp_path):
    RunDir.create(tmp_path / "empty", get_preset("tiny"))
    with pytest.raises(CheckpointError, match="has no trained segmenter.*lad-fast train segmenter"):
        load_segmenter(tmp_path / "empty")


def test_a_dataset_without_masks_cannot_train(data, tmp_path):
    for i in range(4):
        _drop_mask(data, i)
    with pytest.raises(InputError, match=r"no case has a mask.*`lad-fast import-masks .*--segmenter RUN"):
        train_segmenter(tmp_path / "r", tiny_cfg(), data=data, device="cpu")


def test_split_uses_labelled_cases_only(data):
    _drop_mask(data, 1)
    train_idx, val_idx = labelled_split(PreparedDataset(data))
    assert train_idx == [0, 2] and val_idx == [3]


def test_segmenter_preset_warms_up_then_decays():
    from lad_fast.config import get_preset
    from lad_fast.train.schedule import lr_factor

    tc = get_preset("tiny").segmenter_train
    f = lr_factor(tc)
    warm = round(tc.warmup_fraction * tc.steps)
    assert warm > 0 and f(0) < f(warm - 1) == pytest.approx(1.0)
    assert f(tc.steps // 2) < f(warm) and f(tc.steps) == pytest.approx(tc.final_lr_fraction)


# ------------------------------------------------------------------------------------------ augmentation


def _reference_shift(a: np.ndarray, s, fill):
    out = np.full_like(a, fill)
    d, h, w = a.shape[-3:]
    for z in range(d):
        for y in range(h):
            for x in range(w):
                zz, yy, xx = z - s[0], y - s[1], x - s[2]
                if 0 <= zz < d and 0 <= yy < h and 0 <= xx < w:
                    out[..., z, y, x] = a[..., zz, yy, xx]
    return out


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, -2, 2), (-1, 2, -1), (3, 0, -4)])
def test_shift_matches_a_loop_reference(shift):
    a = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    np.testing.assert_array_equal(_shift(a, shift, -1.0).numpy(), _reference_shift(a.numpy(), shift, -1.0))


def test_augmented_batches_are_pure_shifted_and_keep_sides(phantoms):
    ds = PreparedDataset(phantoms)
    source = PreparedBatches(ds, 2, seed=0, indices=[0, 1, 2])
    batches = SegmenterBatches(source, seed=0, hu_window=ds.geometry.hu_window)
    a, b = batches(5), batches(5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(batches(6)["image"], a["image"])
    raw = source(5)
    right, left = CANONICAL_ID["kidney_right"], CANONICAL_ID["kidney_left"]
    lim = SHIFT_VOXELS
    for i in range(2):
        # The augmented mask is the raw mask moved by a small shift, never mirrored.
        shifts = [
            (z, y, x)
            for z in range(-lim[0], lim[0] + 1)
            for y in range(-lim[1], lim[1] + 1)
            for x in range(-lim[2], lim[2] + 1)
            if torch.equal(_shift(raw["mask"][i], (z, y, x), 0), a["mask"][i])
        ]
        assert shifts, "augmented mask is not a small shift of the original"
        m = a["mask"][i].numpy()
        w = np.arange(m.shape[-1])
        # W increases toward the patient's right: the right kidney stays at larger W.
        assert (w * (m == right)).sum() / (m == right).sum() > (w * (m == left)).sum() / (m == left).sum()
        # Intensity jitter is small: a few HU where the shift leaves the voxel inside the volume.
        moved = _shift(raw["image"][i], shifts[0], -1.0)
        assert float((moved - a["image"][i]).abs().mean()) < 30 / 700


# ------------------------------------------------------------------------------------------- predicting


@pytest.fixture
def truth(phantoms, monkeypatch):
    """The segmenter's predictions of the phantoms' prepared images are their true masks."""
    import lad_fast.train.segmenter as seg

    ds = PreparedDataset(phantoms)
    truth = TruthPredictions([(np.asarray(ds[i]["image"]), np.asarray(ds[i]["mask"])) for i in range(4)])
    monkeypatch.setattr(seg, "predict_volumes", truth)
    return truth


def test_predict_masks_fills_unlabelled_cases_atomically(trained, data, truth):
    run, _ = trained
    true_mask = np.load(data / "cases" / "phantom_0_0002" / "mask.npy")
    case = _drop_mask(data, 2)
    before = {p: p.read_bytes() for p in (data / "cases").glob("*/mask.npy")}
    written = predict_masks(run, data, device="cpu")
    assert written == [case]
    entry = PreparedDataset(data).entry(case)
    assert entry["has_mask"] and entry["mask_source"] == f"predicted:{run}"
    mask = np.load(data / "cases" / case / "mask.npy")
    np.testing.assert_array_equal(mask, true_mask)  # what the segmenter predicted for its image
    assert mask.dtype == np.uint8
    cfg = get_preset("tiny")
    np.testing.assert_array_equal(
        np.load(data / "cases" / case / "structure.npy"), structure_condition(mask, cfg.condition)
    )
    assert {p: p.read_bytes() for p in before} == before  # labelled cases untouched
    assert predict_masks(run, data, device="cpu") == []  # nothing left to do
    assert len(predict_masks(run, data, device="cpu", force=True)) == 4


def test_predictions_are_checked_for_organs_then_for_the_window_organs(trained, data, truth):
    """A prediction with organs but none of the window organs is refused after the other cases are
    written; with ``keep_going`` (the main job) it is only named in a warning; with ``allow_empty`` it is
    written with a warning. A prediction with (almost) no organ is never written."""
    from lad_fast.data.geometry import window_organ_ids
    from lad_fast.data.masks import EmptyMaskWarning

    run, _ = trained
    good, missing, empty = (_drop_mask(data, i) for i in (0, 1, 2))
    (image, labels), (image_empty, _) = truth.columns[1:3]
    window_organs = window_organ_ids(PreparedDataset(data).geometry)
    truth.columns[1] = (image, np.where(np.isin(labels, window_organs), 0, labels))
    truth.columns[2] = (image_empty, np.zeros_like(labels))

    def has_mask() -> list[bool]:
        return [c["has_mask"] for c in json.loads((data / "index.json").read_text())["cases"][:3]]

    with pytest.raises(InputError) as refused:
        predict_masks(run, data, device="cpu")
    message = str(refused.value)
    assert message.startswith(
        f"the segmenter of {run} predicted no organ, or organs on fewer than 0.5% of the voxels, for 1 of 3 "
        f"case(s) ({empty}) and none of the organs the slice window is chosen by (pancreas, "
        f"pancreatic_lesion) inside that window for 1 of 3 case(s) ({missing}); they keep no mask, the "
        "other 1 got theirs; train the segmenter longer"
    )
    assert message.endswith(
        f"; to write the predictions without pancreas, pancreatic_lesion anyway: "
        f"`lad-fast predict-masks {data} --run {run} --allow-empty`"
    )
    assert has_mask() == [True, False, False]  # the good one is written
    assert PreparedDataset(data).entry(good)["mask_source"] == f"predicted:{run}"

    before = (data / "index.json").read_bytes()
    with pytest.warns(UserWarning, match=r"for 1 of 2 case\(s\) \(.*\); they keep no mask;") as caught:
        assert predict_masks(run, data, device="cpu", keep_going=True) == []
    assert len(caught) == 1 and (data / "index.json").read_bytes() == before

    with pytest.warns(UserWarning) as caught:
        assert predict_masks(run, data, device="cpu", allow_empty=True) == [missing]
    (allowed,) = [str(w.message) for w in caught if w.category is EmptyMaskWarning]
    assert allowed.startswith(f"case {missing} (predicted:{run}): mask holds none of the organs")
    assert allowed.endswith("written anyway (--allow-empty)")
    (named,) = [str(w.message) for w in caught if w.category is not EmptyMaskWarning]
    assert f"no organ, or organs on fewer than 0.5% of the voxels, for 1 of 2 case(s) ({empty})" in named
    assert has_mask() == [True, True, False]


def test_predict_masks_refuses_another_preset(trained, data):
    run, _ = trained
    index = json.loads((data / "index.json").read_text())
    index["preset"] = "lad"
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="prepared at preset 'lad', but 'tiny' is needed"):
        predict_masks(run, data, device="cpu")


def test_evaluation_scores_a_perfect_and_an_empty_prediction(phantoms):
    class Oracle(torch.nn.Module):
        """Predicts a fixed label map whatever the input (stands in for a perfect segmenter)."""

        def __init__(self, masks):
            super().__init__()
            self.masks, self.calls = masks, 0

        def predict(self, x):
            out = self.masks[self.calls : self.calls + x.shape[0]]
            self.calls += x.shape[0]
            return out

    ds = PreparedDataset(phantoms)
    truth = torch.from_numpy(np.stack([np.asarray(ds[i]["mask"]) for i in range(4)]))
    scores = evaluate_segmenter(Oracle(truth), ds, [0, 1, 2, 3])
    assert scores["cases"] == 4 and set(scores["dice"].values()) == {1.0}
    scores = evaluate_segmenter(Oracle(torch.zeros_like(truth)), ds, [0, 1, 2, 3])
    assert set(scores["dice"].values()) == {0.0} and set(scores["dice_pooled"].values()) == {0.0}


def test_render_prediction_stacks_true_over_predicted(phantoms):
    ds = PreparedDataset(phantoms)
    item = ds[0]
    both = render_prediction(item["image"], np.asarray(item["mask"]), item["mask"], ds.geometry, "case")
    one = render_prediction(item["image"], np.asarray(item["mask"]), None, ds.geometry)
    assert both.height == 2 * one.height and both.width == one.width


def test_predict_masks_command(trained, data, tmp_path, truth):
    import typer
    from typer.testing import CliRunner

    from lad_fast.cli.masks_cmd import predict_masks as command

    app = typer.Typer()
    app.command()(command)
    run, _ = trained
    case = _drop_mask(data, 0)
    result = CliRunner().invoke(app, [str(data), "--run", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "predicted masks for 1 case(s)" in result.output
    assert PreparedDataset(data).entry(case)["mask_source"] == f"predicted:{run}"
    RunDir.create(tmp_path / "bare", get_preset("tiny"))
    result = CliRunner().invoke(app, [str(data), "--run", str(tmp_path / "bare")])
    assert isinstance(result.exception, CheckpointError)
    assert "has no trained segmenter" in str(result.exception)


# ------------------------------------------------------------------------------ prepare --segmenter


def _column_truth(raw: Path, ids: list[str], geometry) -> TruthPredictions:
    """Predictions equal to the true labels over the whole height of the raw phantoms ``ids``."""
    from lad_fast.data.geometry import column_case, hu_to_unit
    from lad_fast.data.io import read_image, read_labels
    from lad_fast.data.labels import to_canonical

    columns = []
    for case in ids:
        labels = read_labels(raw / "masks" / f"{case}.nii.gz")
        canonical, _ = to_canonical(labels.array, "totalseg", affine=labels.affine)
        column = column_case(read_image(raw / "images" / f"{case}.nii.gz"), labels, geometry, canonical)
        columns.append((hu_to_unit(column.hu, geometry.hu_window), column.mask))
    return TruthPredictions(columns)


def test_prepare_predicts_masks_for_unlabelled_cases(trained, phantoms, tmp_path, capsys, monkeypatch):
    """Prepared without masks, the cases get their window chosen again from the predictions over their
    whole height: the arrays of preparing image and mask together."""
    import lad_fast.train.segmenter as seg
    from lad_fast.cli.app import main

    run, _ = trained
    ids = ["phantom_0_0000", "phantom_0_0001"]
    src = tmp_path / "src" / "images"
    src.mkdir(parents=True)
    for case in ids:
        shutil.copy(phantoms.parent / "raw" / "images" / f"{case}.nii.gz", src)
    plain = tmp_path / "plain"
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(src.parent), str(plain), "--preset", "tiny"])
    assert exc.value.code == 0
    assert "2 case(s) have no mask" in capsys.readouterr().err

    ref = PreparedDataset(phantoms)
    monkeypatch.setattr(seg, "predict_volumes", _column_truth(phantoms.parent / "raw", ids, ref.geometry))
    out = tmp_path / "prepared"
    args = ["prepare", str(src.parent), str(out), "--preset", "tiny", "--segmenter", str(run)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--device", "cpu"])
    assert exc.value.code == 0
    ours = PreparedDataset(out)
    assert ours.case_ids == ids
    for i, case in enumerate(ids):
        entry = ours.entry(case)
        assert entry["mask_source"] == f"predicted:{run}" and entry["window"] == "later mask"
        assert entry["crop"] == ref.entry(case)["crop"]
        for name in ("image", "mask", "structure", "affine"):
            np.testing.assert_array_equal(np.asarray(ours[i][name]), np.asarray(ref[i][name]), err_msg=name)


def test_labelled_indices_come_from_the_index(data):
    dropped = _drop_mask(data, 1)
    ds = PreparedDataset(data)
    assert ds.labelled_indices() == [0, 2, 3] and ds.case_ids[1] == dropped


def test_predict_masks_records_no_empty_or_tiny_prediction(trained, data, monkeypatch):
    """All background (an undertrained segmenter) or a few voxels: warned about and not recorded; a call
    where no case gets a plausible mask is refused."""
    import lad_fast.train.segmenter as seg

    run, _ = trained
    empty, tiny, good = (_drop_mask(data, i) for i in (0, 1, 2))
    organs = np.asarray(PreparedDataset(data)[3]["mask"])  # a real mask stands in for a good prediction

    def fake(net, images, device):
        out = np.zeros(images.shape, dtype=np.uint8)
        out[1, 0, 0, :3] = CANONICAL_ID["liver"]  # 3 voxels of liver
        out[2] = organs
        return out

    monkeypatch.setattr(seg, "predict_volumes", fake)
    with pytest.warns(UserWarning) as caught:
        written = predict_masks(run, data, device="cpu")
    assert written == [good]
    message = str(caught[0].message)
    assert f"for 2 of 3 case(s) ({empty}, {tiny}); they keep no mask" in message
    assert "organs on fewer than 0.5% of the voxels" in message and "lad-fast import-masks" in message
    ds = PreparedDataset(data)
    assert not ds.entry(empty)["has_mask"] and not ds.entry(tiny)["has_mask"]
    assert not (data / "cases" / empty / "mask.npy").exists()

    monkeypatch.setattr(seg, "predict_volumes", lambda net, images, device: np.zeros(images.shape, np.uint8))
    before = (data / "index.json").read_bytes()
    with pytest.raises(InputError, match=r"predicted no organ.* for 2 of 2 case\(s\).*segmenter longer"):
        predict_masks(run, data, device="cpu")
    assert (data / "index.json").read_bytes() == before
