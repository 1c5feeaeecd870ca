"""lad_fast.runs.loading: the one loader shape of the three models, on checkpoints written directly.

Training-based checks of each loader live beside their trainer (tests/train/test_*_train.py); here
checkpoints are written with :func:`lad_fast.runs.checkpoints.save_checkpoint` in the ``meta.json`` layout
the training loop writes (``model``, ``preset``, ``data_hash``, ``model_config``, ``extra``), so each
contract is checked in milliseconds and for all three models alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import rewrite_meta, small_config

from lad_fast.conditioning.conditions import structure_dim
from lad_fast.config import SegmenterConfig, config_to_dict
from lad_fast.errors import CheckpointError
from lad_fast.models.segmenter import Segmenter
from lad_fast.models.unet import LatentUNet
from lad_fast.models.vqgan import VQGAN
from lad_fast.organs import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.runs.checkpoints import save_checkpoint
from lad_fast.runs.loading import (
    checkpoint_hash,
    load_diffusion,
    load_sampling_models,
    load_segmenter,
    load_vqgan,
    predict_volumes,
)
from lad_fast.runs.rundir import RunDir

MODELS = ("vqgan", "diffusion", "segmenter")
LOADERS = {"vqgan": load_vqgan, "diffusion": load_diffusion, "segmenter": load_segmenter}
WHAT = {"vqgan": "VQ-GAN", "diffusion": "diffusion model", "segmenter": "segmenter"}


def config():
    return replace(small_config(), segmenter=SegmenterConfig(channels=(8, 16), groups=4))


def build(model: str, cfg) -> tuple[torch.nn.Module, dict, dict]:
    """(module, model_config, extra) as the trainer of ``model`` records them."""
    torch.manual_seed(0)
    if model == "vqgan":
        extra = {"latent_scale": [-2.0, 3.0], "heldout": {"l1": 0.1}}
        return VQGAN(cfg.vqgan), config_to_dict(cfg.vqgan), extra
    if model == "diffusion":
        c, s = cfg.vqgan.latent_channels, structure_dim(cfg.geometry.shape[0], cfg.condition)
        mc = {
            "unet": config_to_dict(cfg.unet),
            "condition": config_to_dict(cfg.condition),
            "diffusion": config_to_dict(cfg.diffusion),
            "latent_channels": c,
            "structure_dim": s,
        }
        extra = {"vqgan_run": "/somewhere", "vqgan_hash": "0" * 16, "latent_norm": None, "structure_dim": s}
        return LatentUNet(cfg.unet, cfg.condition, c, s), mc, extra
    mc = {"segmenter": config_to_dict(cfg.segmenter), "num_classes": NUM_CLASSES}
    return Segmenter(cfg.segmenter, NUM_CLASSES), mc, {"organs": list(CANONICAL_ORGANS), "train_cases": 3}


def write(run: Path, model: str, ema: bool = True, model_config: dict | None = None) -> dict:
    """A run holding one checkpoint of ``model``; returns the EMA tensors (or the raw ones without)."""
    cfg = config()
    RunDir.create(run, cfg)
    net, mc, extra = build(model, cfg)
    # EMA weights that differ from the raw ones, so the test sees which were loaded.
    averaged = {k: (v + 0.5 if v.is_floating_point() else v).clone() for k, v in net.state_dict().items()}
    save_checkpoint(
        run / model,
        7,
        modules={"model": net},
        tensors={"ema": averaged} if ema else None,
        state={"step": 7},
        meta={
            "model": model,
            "preset": cfg.preset,
            "data_hash": "d" * 64,
            "model_config": mc if model_config is None else model_config,
            "extra": extra,
        },
    )
    return averaged if ema else net.state_dict()


@pytest.mark.parametrize("model", MODELS)
def test_each_loader_gives_a_frozen_eval_module_with_ema_weights_and_meta_by_one_rule(tmp_path, model):
    run = tmp_path / "run"
    want = write(run, model)
    net, meta = LOADERS[model](run)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    got = net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    stored = json.loads((run / model / "step-00000007" / "meta.json").read_text())
    # {**meta.json, **extra} + checkpoint + checkpoint_hash (+ the model's own entries below)
    for key, value in {**stored, **stored["extra"]}.items():
        assert meta[key] == value, key
    assert meta["extra"] == stored["extra"] and meta["step"] == 7 and meta["preset"] == "tiny"
    assert meta["checkpoint"] == str(run / model / "step-00000007")
    assert meta["checkpoint_hash"] == checkpoint_hash(run / model) and len(meta["checkpoint_hash"]) == 16
    own = set(meta) - set(stored) - set(stored["extra"]) - {"checkpoint", "checkpoint_hash"}
    assert own == {"vqgan": set(), "diffusion": {"diffusion_config"}, "segmenter": {"config"}}[model]
    if model == "diffusion":
        assert meta["diffusion_config"] == config().diffusion
    if model == "segmenter":
        assert meta["config"] == RunDir.open(run).config_dict()


@pytest.mark.parametrize("model", MODELS)
def test_without_ema_the_raw_weights_load(tmp_path, model):
    want = write(tmp_path / "run", model, ema=False)
    got = LOADERS[model](tmp_path / "run")[0].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("model", MODELS)
def test_each_loader_says_which_model_is_missing_and_how_to_train_it(tmp_path, model):
    run = tmp_path / "run"
    RunDir.create(run, config())
    with pytest.raises(
        CheckpointError,
        match=rf"run {run} has no trained {WHAT[model]} \(no complete checkpoint in {run / model}\); "
        rf"train one with `lad-fast train {model} --run {run}`",
    ):
        LOADERS[model](run)
    with pytest.raises(CheckpointError, match=r"run folder .*absent does not exist"):
        LOADERS[model](tmp_path / "absent")


@pytest.mark.parametrize("model", MODELS)
def test_a_model_config_that_builds_nothing_is_named(tmp_path, model):
    run = tmp_path / "run"
    write(run, model, model_config={"vqgan": {"nonsense": 1}} if model == "vqgan" else {"unet": {}})
    expect = r"meta.json: no usable model_config"
    with pytest.raises(CheckpointError, match=expect):
        LOADERS[model](run)


def test_weights_of_another_shape_are_named(tmp_path):
    run = tmp_path / "run"
    write(run, "segmenter", model_config={"segmenter": {"channels": [4, 8], "groups": 4}})
    with pytest.raises(CheckpointError, match=r"ema.safetensors does not fit this Segmenter"):
        load_segmenter(run)


def test_predict_volumes_batches_keep_the_mode_and_match_one_at_a_time():
    torch.manual_seed(0)
    net = Segmenter(SegmenterConfig(channels=(8, 16), groups=4), NUM_CLASSES).train()
    images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 16, 16)).astype(np.float32)
    labels = predict_volumes(net, images, "cpu", batch_size=2)
    assert net.training  # left as it was
    assert labels.shape == (3, 8, 16, 16) and labels.dtype == np.uint8
    net.eval()
    for i in range(3):
        np.testing.assert_array_equal(labels[i], net.predict(torch.from_numpy(images[i : i + 1, None]))[0])
    assert predict_volumes(net, images[:0], "cpu").shape == (0, 8, 16, 16)


@pytest.mark.parametrize("model", MODELS)
def test_checkpoints_of_an_older_lad_fast_without_newer_config_fields_load(tmp_path, model):
    """A model_config and config.json written before a field existed: the field takes its default."""
    cfg = config()
    _, mc, _ = build(model, cfg)
    old = json.loads(json.dumps(mc))
    name = {"vqgan": "vqgan", "diffusion": "condition", "segmenter": "segmenter"}[model]
    section = old if model == "vqgan" else old[name]
    dropped = {"vqgan": "resample", "diffusion": "spatial", "segmenter": "groups"}[model]
    default = section.pop(dropped)
    run = tmp_path / "run"
    write(run, model, model_config=old)
    raw = json.loads((run / "config.json").read_text())
    raw[name].pop(dropped)
    (run / "config.json").write_text(json.dumps(raw))
    net, _ = LOADERS[model](run)
    assert net is not None and default is not None


@pytest.mark.parametrize(
    ("edit", "what"),
    [
        (lambda m: m.update(step="7"), r"step '7' is not a step number"),
        (lambda m: m.update(files=["model.safetensors"]), r"its file list is not"),
        (lambda m: [v.pop("bytes") for v in m["files"].values()], r"its file list is not"),
        (lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": "0"}}), r"its file list is not"),
        (lambda m: m.update(files={}), r"it does not list ema\.safetensors, model\.safetensors, state\.pt"),
        (lambda m: m.update(extra=[1]), r"extra is not a mapping"),
    ],
)
def test_an_edited_meta_json_is_one_line(tmp_path, edit, what):
    run = tmp_path / "run"
    write(run, "vqgan")
    (meta_path,) = (run / "vqgan").glob("step-*/meta.json")
    meta = json.loads(meta_path.read_text())
    edit(meta)
    rewrite_meta(meta_path, meta)  # still valid JSON, sealed as if lad-fast had written it
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(meta_path))} was edited or damaged \({what}.*\); the checkpoint cannot be",
    ):
        load_vqgan(run)


def _count_opens_and_parses(monkeypatch) -> tuple[list[Path], list[Path]]:
    """Record every RunDir.open and every read of a config.json from now on."""
    opened, parsed = [], []
    real_open, real_raw = RunDir.open.__func__, RunDir._raw_config

    def counting_open(cls, path):
        opened.append(Path(path))
        return real_open(cls, path)

    def counting_raw(self):
        parsed.append(self.path)
        return real_raw(self)

    monkeypatch.setattr(RunDir, "open", classmethod(counting_open))
    monkeypatch.setattr(RunDir, "_raw_config", counting_raw)
    return opened, parsed


def test_sampling_models_load_in_one_pass_over_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write(run, "vqgan")
    cfg = config()
    net, mc, extra = build("diffusion", cfg)
    extra = {**extra, "vqgan_run": ".", "vqgan_hash": checkpoint_hash(run / "vqgan")}  # trained on its own
    meta = {
        "model": "diffusion",
        "preset": cfg.preset,
        "data_hash": "d" * 64,
        "model_config": mc,
        "extra": extra,
    }
    save_checkpoint(run / "diffusion", 3, modules={"model": net}, state={"step": 3}, meta=meta)
    opened, parsed = _count_opens_and_parses(monkeypatch)
    models = load_sampling_models(run, "cpu")
    assert opened == [run] and parsed == [run]  # its own VQ-GAN: the run is not opened again
    assert models.cfg == cfg and models.rundir.path == run and models.vqgan_run == run
    assert models.vqgan_hash == checkpoint_hash(run / "vqgan") == models.vq_meta["checkpoint_hash"]
    assert models.meta["checkpoint_hash"] == checkpoint_hash(run / "diffusion")
    rundir = RunDir.open(run)
    opened.clear()
    load_sampling_models(rundir, "cpu")
    assert opened == []  # an opened run is used as it is


def test_an_opened_run_reads_its_config_once(tmp_path, monkeypatch):
    RunDir.create(tmp_path / "r", config())
    opened, parsed = _count_opens_and_parses(monkeypatch)
    run = RunDir.open(tmp_path / "r")
    assert run.config() is run.config() and run.config_dict() == config_to_dict(config())
    assert parsed == [tmp_path / "r"]
