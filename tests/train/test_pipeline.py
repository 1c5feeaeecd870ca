"""``train_pipeline``, the README's main job (``lad-fast train``): every stage, resume, refusal."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _shared import TruthPredictions, small_config

from lad_fast.config import SegmenterConfig
from lad_fast.data.geometry import window_organ_ids
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.runs.checkpoints import load_checkpoint
from lad_fast.train.pipeline import train_pipeline

STEPS = 2


def _config():
    cfg = small_config()
    return replace(
        cfg,
        segmenter=SegmenterConfig(channels=(8, 16), groups=4),
        segmenter_train=replace(cfg.segmenter_train, batch_size=1, checkpoint_every=STEPS),
    )


def _unlabel(data: Path, cases: list[int]) -> list[str]:
    """Make ``cases`` unlabelled, as prepare writes a case without a mask."""
    index = json.loads((data / "index.json").read_text())
    for i in cases:
        entry = index["cases"][i]
        entry.update(has_mask=False, mask_source=None, vocabulary=None, mask_hash=None)
        for name in ("mask.npy", "structure.npy"):
            (data / "cases" / entry["id"] / name).unlink()
    (data / "index.json").write_text(json.dumps(index))
    return [index["cases"][i]["id"] for i in cases]


def _steps(run: Path) -> dict[str, int]:
    return {m: load_checkpoint(run / m, m).step for m in ("vqgan", "segmenter", "diffusion")}


def _record_opens(monkeypatch) -> list[Path]:
    """The folders of the prepared datasets opened from now on, in order."""
    opened: list[Path] = []
    real = PreparedDataset.__init__

    def init(self, path, *args, **kwargs):
        opened.append(Path(path))
        real(self, path, *args, **kwargs)

    monkeypatch.setattr(PreparedDataset, "__init__", init)
    return opened


def _truth(data: Path, miss_window_organs: str) -> TruthPredictions:
    """Predictions equal to the true masks of ``data``, but none of the window organs for one case."""
    ds = PreparedDataset(data)
    columns = []
    for i, case in enumerate(ds.case_ids):
        mask = np.asarray(ds[i]["mask"])
        if case == miss_window_organs:
            mask = np.where(np.isin(mask, window_organ_ids(ds.geometry)), 0, mask)
        columns.append((np.asarray(ds[i]["image"]), mask))
    return TruthPredictions(columns)


def test_pipeline_trains_every_stage_and_resumes(tiny_phantoms, tmp_path, monkeypatch):
    """The segmenter is trained, and its predictions replaced by known ones: one case gets its mask, the
    other a mask without the window organs, which the main job names in a warning and does not record
    (``lad-fast predict-masks`` refuses it) instead of stopping."""
    import lad_fast.train.segmenter as seg

    monkeypatch.setenv("LAD_FAST_QUIET", "1")
    data = shutil.copytree(tiny_phantoms, tmp_path / "data")
    monkeypatch.setattr(seg, "predict_volumes", _truth(data, miss_window_organs="phantom_0_0002"))
    filled, missed = _unlabel(data, [1, 2])
    images_hash = PreparedDataset(data).content_hash(masks=False)
    run = tmp_path / "run"

    opened = _record_opens(monkeypatch)
    with pytest.warns(UserWarning) as caught:
        assert train_pipeline(run, _config(), data=data, steps=STEPS, device="cpu") == run
    (warning,) = [str(w.message) for w in caught if "segmenter of" in str(w.message)]
    assert "\n" not in warning
    assert f"inside that window for 1 of 2 case(s) ({missed}); they keep no mask, the other 1" in warning
    assert f"`lad-fast predict-masks {data} --run {run} --allow-empty`" in warning
    # opened once and handed to every stage: the diffusion stage sees the masks predicted on it
    assert opened == [data]
    assert _steps(run) == {"vqgan": STEPS, "segmenter": STEPS, "diffusion": STEPS}
    ds = PreparedDataset(data)
    assert ds.labelled_indices() == [0, 1]  # the segmenter filled one case; the other keeps no mask
    assert ds.entry(filled)["mask_source"] == f"predicted:{run}" and not ds.entry(missed)["has_mask"]
    meta = {m: load_checkpoint(run / m, m).meta for m in ("vqgan", "diffusion")}
    assert meta["vqgan"]["data_hash"] == images_hash == ds.content_hash(masks=False)
    assert meta["diffusion"]["data_hash"] == ds.content_hash()  # with the predicted mask
    assert meta["diffusion"]["extra"]["cases"] == 2

    # --resume of a finished pipeline: phase 1 still accepts the data although masks were added since.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors") if "latents" not in p.name}
    with pytest.warns(UserWarning, match=re.escape(f"for 1 of 1 case(s) ({missed}); they keep no mask;")):
        train_pipeline(run, _config(), data=data, steps=STEPS, resume=True, device="cpu")
    assert _steps(run) == {"vqgan": STEPS, "segmenter": STEPS, "diffusion": STEPS}
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors") if "latents" not in p.name}
    assert after == before  # nothing retrained


def test_pipeline_refuses_a_dataset_without_any_mask_before_training(tiny_phantoms, tmp_path):
    data = shutil.copytree(tiny_phantoms, tmp_path / "data")
    _unlabel(data, [0, 1, 2])
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"data: no case has a mask, so the organ segmenter") as e:
        train_pipeline(run, _config(), data=data, steps=STEPS, device="cpu")
    assert not run.exists()  # refused before phase 1 wrote anything
    # it names the commands that add masks, not a Python module
    assert f"`lad-fast import-masks {data} MASKS`" in str(e.value)
    assert f"`lad-fast prepare SRC {data} --segmenter RUN`" in str(e.value)
    assert "lad_fast." not in str(e.value)


def test_cli_train_refuses_data_without_masks_in_one_line(tiny_phantoms, tmp_path, capsys):
    from lad_fast.cli.app import main

    data = shutil.copytree(tiny_phantoms, tmp_path / "data")
    _unlabel(data, [0, 1, 2])
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(data), "--run", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lad-fast: error: {data}: no case has a mask") and "lad-fast import-masks" in err
    assert not (tmp_path / "run").exists()
