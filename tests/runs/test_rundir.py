"""lad_fast.runs.rundir (run folders, the log, latest_run) and lad_fast.runs.checkpoints (step folders)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest
import torch

import lad_fast.runs.checkpoints as ck
from lad_fast.config import get_preset
from lad_fast.errors import CheckpointError, ConfigError, OutputExistsError
from lad_fast.runs.checkpoints import latest_step_dir, load_checkpoint, save_checkpoint
from lad_fast.runs.rundir import RunDir, latest_run
from lad_fast.utils.atomic import atomic_dir


def _save(model_dir, step, value, model="vqgan", keep=2):
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(value)
    return save_checkpoint(
        model_dir,
        step,
        modules={"model": net},
        tensors={"ema": {"weight": torch.full((2, 3), value)}},
        state={"step": step, "blob": torch.arange(1000)},
        meta={"model": model},
        keep=keep,
    )


def _weight(ckpt) -> float:
    return float(ckpt.tensors("model")["weight"][0, 0])


# -- run folders -----------------------------------------------------------------------------------------


def test_create_and_reopen(tmp_path):
    cfg = get_preset("tiny")
    run = RunDir.create(tmp_path / "r", cfg)
    assert run.config() == cfg
    # Training-schedule changes are recorded; the run reopens.
    longer = replace(cfg, vqgan_train=replace(cfg.vqgan_train, steps=900))
    assert RunDir.create(tmp_path / "r", longer).config().vqgan_train.steps == 900
    assert RunDir.open(tmp_path / "r").path == tmp_path / "r"
    assert run.model_dir("diffusion") == tmp_path / "r" / "diffusion"


def test_reopen_with_other_model_config(tmp_path):
    cfg = get_preset("tiny")
    RunDir.create(tmp_path / "r", cfg)
    other = replace(cfg, vqgan=replace(cfg.vqgan, codebook_size=64))
    with pytest.raises(
        CheckpointError, match=r"created with another config \(vqgan.codebook_size: 512 -> 64\)"
    ):
        RunDir.create(tmp_path / "r", other)


def test_folder_lad_fast_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(
        OutputExistsError, match=r"mine is not a lad-fast run \(no config.json; it holds notes.txt\)"
    ):
        RunDir.create(tmp_path / "mine", get_preset("tiny"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"  # nothing touched
    RunDir.create(tmp_path / "r", get_preset("tiny"))
    (tmp_path / "r" / "stray.bin").write_bytes(b"1")
    with pytest.raises(OutputExistsError, match=r"holds files lad-fast did not write \(stray.bin\)"):
        RunDir.open(tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"nope does not exist"):
        RunDir.open(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"unknown model 'gan'"):
        RunDir(tmp_path / "r").model_dir("gan")


def test_other_models_checkpoint_under_the_name(tmp_path):
    _save(tmp_path / "vqgan", 1, 0.5, model="diffusion")
    with pytest.raises(CheckpointError, match=r"holds a 'diffusion' checkpoint, not 'vqgan'"):
        load_checkpoint(tmp_path / "vqgan", "vqgan")


def test_latest_run(tmp_path):
    with pytest.raises(CheckpointError, match=r"no complete run under .*train one first or pass --run"):
        latest_run(tmp_path)
    cfg = get_preset("tiny")
    for name in ("old", "new", "half"):
        RunDir.create(tmp_path / name, cfg)
    for name in ("old", "new"):
        _save(tmp_path / name / "vqgan", 1, 0.0, model="vqgan")
        _save(tmp_path / name / "diffusion", 1, 0.0, model="diffusion")
    _save(tmp_path / "half" / "vqgan", 1, 0.0)  # no diffusion: not complete
    os.utime(tmp_path / "old" / "diffusion" / "step-00000001" / "meta.json", (1, 1))
    os.utime(tmp_path / "old" / "vqgan" / "step-00000001" / "meta.json", (1, 1))
    assert latest_run(tmp_path) == tmp_path / "new"


def test_truncate_log_and_torn_line(tmp_path):
    run = RunDir.create(tmp_path / "r", get_preset("tiny"))
    for s in (1, 2, 3):
        run.log({"model": "vqgan", "step": s})
    run.log({"model": "diffusion", "step": 9})
    with open(run.log_path, "a") as f:
        f.write('{"model": "vqg')  # a kill mid-append
    run.truncate_log("vqgan", after_step=1)
    assert [(r["model"], r["step"]) for r in run.read_log()] == [("vqgan", 1), ("diffusion", 9)]


# -- checkpoints -----------------------------------------------------------------------------------------


def test_save_load_and_prune(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path / "m", step, float(step))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["latest", "step-00000002", "step-00000003"]
    ckpt = load_checkpoint(tmp_path / "m", "vqgan")
    assert ckpt.step == 3 and _weight(ckpt) == 3.0 and torch.equal(ckpt.state["blob"], torch.arange(1000))
    net = torch.nn.Linear(3, 2)
    ckpt.load_module("model", net)
    assert float(net.weight.detach()[0, 0]) == 3.0
    with pytest.raises(CheckpointError, match=r"model.safetensors does not fit this Linear"):
        ckpt.load_module("model", torch.nn.Linear(4, 2))
    assert load_checkpoint(tmp_path / "empty", "vqgan") is None


# Every stage of a write, in order; an exception in any of them must leave ``latest`` readable.
_STAGES = ["save_model", "save_file", "torch_save", "fsync", "meta", "rename", "pointer", "prune"]


@pytest.mark.parametrize("stage", _STAGES)
def test_interrupted_write_never_leaves_unreadable_latest(tmp_path, monkeypatch, stage):
    import safetensors.torch as st

    _save(tmp_path / "m", 1, 1.0)
    _save(tmp_path / "m", 2, 2.0)

    def boom(*a, **k):
        raise KeyboardInterrupt(stage)

    def half(real):  # write part of the file, then die: a truncated file in the temporary folder
        def run(*a, **k):
            real(*a, **k)
            path = a[1] if len(a) > 1 else k.get("filename") or k.get("f")
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 2, 1))
            raise KeyboardInterrupt(stage)

        return run

    if stage == "save_model":
        monkeypatch.setattr(st, "save_model", half(st.save_model))
    elif stage == "save_file":
        monkeypatch.setattr(st, "save_file", half(st.save_file))
    elif stage == "torch_save":
        monkeypatch.setattr(ck.torch, "save", half(torch.save))
    elif stage == "fsync":
        monkeypatch.setattr(ck, "_fsync", boom)
    elif stage == "meta":
        monkeypatch.setattr(ck, "file_sha256", boom)
    elif stage == "rename":
        real_replace = os.replace

        def replace_dir(src, dst):  # the folder rename itself fails (the pointer write is a file rename)
            if os.path.isdir(src):
                raise KeyboardInterrupt(stage)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_dir)
    elif stage == "pointer":
        monkeypatch.setattr(ck, "write_text", boom)
    elif stage == "prune":
        monkeypatch.setattr(ck.shutil, "rmtree", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "m", 3, 3.0)
    monkeypatch.undo()

    ckpt = load_checkpoint(tmp_path / "m", "vqgan")
    # Before the pointer moves the old checkpoint stays latest; after it, the new one is complete.
    expected = 3 if stage == "prune" else 2
    assert ckpt.step == expected and _weight(ckpt) == float(expected)
    # The next save cleans up whatever the interruption left and works normally.
    _save(tmp_path / "m", 4, 4.0)
    assert load_checkpoint(tmp_path / "m", "vqgan").step == 4
    assert not [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


def test_kill_before_first_pointer_uses_the_complete_folder(tmp_path):
    _save(tmp_path / "m", 1, 1.0)
    (tmp_path / "m" / "latest").unlink()  # killed between the folder rename and the pointer write
    (tmp_path / "m" / ".step-00000002.abc.tmp").mkdir()  # and a half-built next folder
    assert load_checkpoint(tmp_path / "m", "vqgan").step == 1


def test_rewriting_the_latest_step_keeps_it_readable(tmp_path, monkeypatch):
    """atomic_dir moves the old folder aside, so a failing swap restores it instead of losing it."""
    _save(tmp_path / "m", 1, 1.0)
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(str(src))
        if str(src).endswith(".tmp") and os.path.isdir(src):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"), atomic_dir(tmp_path / "m" / "step-00000001") as tmp:
        (tmp / "x").write_text("new")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "m", "vqgan").step == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", r"step-00000002/model.safetensors is truncated or damaged \(\d+ bytes, expected \d+\)"),
        ("flip", r"step-00000002/state.pt is corrupt \(its SHA-256 does not match meta.json\)"),
        ("meta", r"step-00000002/meta.json is missing; the checkpoint is incomplete"),
        ("garbage_meta", r"step-00000002/meta.json was changed after the checkpoint was written"),
        ("pointer", r"latest names 'junk', which is not a checkpoint folder"),
    ],
)
def test_corrupt_checkpoint_is_named(tmp_path, damage, message):
    _save(tmp_path / "m", 1, 1.0)
    _save(tmp_path / "m", 2, 2.0)
    d = tmp_path / "m" / "step-00000002"
    if damage == "truncate":
        p = d / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-7])
    elif damage == "flip":
        p = d / "state.pt"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif damage == "meta":
        (d / "meta.json").unlink()
    elif damage == "garbage_meta":
        (d / "meta.json").write_text("{not json")
    else:
        (tmp_path / "m" / "latest").write_text("junk\n")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "m", "vqgan")
    if damage != "pointer":
        with pytest.warns(UserWarning, match=r"resuming from the previous checkpoint step-00000001"):
            ckpt = load_checkpoint(tmp_path / "m", "vqgan", fallback=True)
        assert ckpt.step == 1 and _weight(ckpt) == 1.0


def test_fallback_without_an_earlier_checkpoint(tmp_path):
    _save(tmp_path / "m", 1, 1.0)
    shutil.rmtree(tmp_path / "m" / "step-00000001")
    (tmp_path / "m" / "step-00000001").mkdir()
    with pytest.raises(CheckpointError, match=r"meta.json is missing.*and no earlier complete checkpoint"):
        load_checkpoint(tmp_path / "m", "vqgan", fallback=True)
    assert latest_step_dir(tmp_path / "m").name == "step-00000001"
