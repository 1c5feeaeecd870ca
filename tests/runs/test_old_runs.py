"""Runs written by an older lad-fast, whose config lacks fields added since, still reopen and resume."""

from __future__ import annotations

import json

import pytest
from _shared import small_config

from lad_fast.config import config_to_dict, with_defaults
from lad_fast.errors import CheckpointError
from lad_fast.runs.rundir import RunDir


def _drop(d: dict, dotted: str) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d[k]
    del d[last]


def test_with_defaults_fills_missing_fields_of_sections_and_of_one_section():
    cfg = config_to_dict(small_config())
    old = json.loads(json.dumps(cfg))
    _drop(old, "condition.spatial")
    _drop(old, "diffusion.objective")
    assert "spatial" not in old["condition"]
    filled = with_defaults(old)
    assert filled["condition"]["spatial"] == "none" and filled["diffusion"]["objective"] == "ddpm"
    assert filled == json.loads(json.dumps(cfg))
    bare = dict(cfg["vqgan"])
    del bare["resample"]
    assert with_defaults(bare, "vqgan")["resample"] == json.loads(json.dumps(cfg["vqgan"]))["resample"]
    # keys that are no config section pass through
    assert with_defaults({"latent_channels": 4})["latent_channels"] == 4


def test_a_run_whose_config_lacks_new_fields_reopens(tmp_path):
    cfg = small_config()
    run = RunDir.create(tmp_path / "run", cfg)
    raw = json.loads(run.config_path.read_text())
    _drop(raw, "condition.spatial")
    run.config_path.write_text(json.dumps(raw))
    RunDir.create(tmp_path / "run", cfg)  # no "condition.spatial: <missing> -> none" refusal
    assert run.config_dict()["condition"]["spatial"] == "none"
    # a real difference is still refused, named by its field
    from dataclasses import replace

    other = replace(cfg, condition=replace(cfg.condition, spatial="concat"))
    with pytest.raises(CheckpointError, match=r"condition\.spatial: none -> concat"):
        RunDir.create(tmp_path / "run", other)


def test_resume_accepts_a_checkpoint_without_new_fields_and_refuses_a_changed_one():
    from lad_fast.runs.checkpoints import config_hash
    from lad_fast.train.loop import _check_resume

    cfg = config_to_dict(small_config())
    current = {"unet": cfg["unet"], "condition": cfg["condition"], "latent_channels": 4}
    stored = json.loads(json.dumps(current))
    del stored["condition"]["spatial"]

    class Ckpt:
        path = "step-00000002"
        meta = {"model_config": stored, "model_config_hash": config_hash(stored)}

    _check_resume(Ckpt, "diffusion", current)  # the missing field took its default: same model
    changed = json.loads(json.dumps(current))
    changed["condition"]["spatial"] = "concat"
    with pytest.raises(CheckpointError, match=r"condition\.spatial: <missing> -> concat|spatial"):
        _check_resume(Ckpt, "diffusion", changed)
    bare = json.loads(json.dumps(cfg["vqgan"]))
    old_bare = dict(bare)
    del old_bare["resample"]

    class VQ:
        path = "step-00000002"
        meta = {"model_config": old_bare, "model_config_hash": config_hash(old_bare)}

    _check_resume(VQ, "vqgan", bare)
