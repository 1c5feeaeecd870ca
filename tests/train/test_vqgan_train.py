"""VQ-GAN training (lad_fast.train.vqgan): meta, previews, evaluation, SIGKILL + resume through the CLI,
bad input, and one training step of the ``lad`` preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lad_fast.config import LadConfig, VQGANConfig, get_preset
from lad_fast.errors import CheckpointError, InputError, OutputExistsError
from lad_fast.runs.checkpoints import load_checkpoint
from lad_fast.runs.loading import load_vqgan
from lad_fast.train.vqgan import evaluate_reconstruction, train_vqgan


def small_cfg(**train: object) -> LadConfig:
    """Smaller than tiny: tiny geometry and data, a 4-8-8 channel model, GAN from step 2."""
    cfg = get_preset("tiny")
    tc = dict(steps=4, batch_size=2, lr=2e-3, checkpoint_every=2, preview_every=2, log_every=1)
    tc.update(train)
    return replace(
        cfg,
        vqgan=VQGANConfig(channels=(4, 8, 8), groups=4, codebook_size=32, latent_channels=8, code_dim=8),
        vqgan_loss=replace(cfg.vqgan_loss, gan_2d=0.25, gan_3d=0.25, gan_start_step=2, disc_channels=4),
        vqgan_train=replace(cfg.vqgan_train, **tc),
    )


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom cache shared by every test of this file (phantoms are generated once)."""
    return tmp_path_factory.mktemp("lad_fast_cache")


@pytest.fixture()
def phantoms(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Six tiny phantoms, prepared (5 train cases + 1 held out)."""
    from lad_fast.data.cache import phantom_dataset

    monkeypatch.setenv("LAD_FAST_CACHE", str(cache))
    return phantom_dataset("tiny", n=6)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ training


def test_train_writes_meta_previews_and_heldout_eval(tmp_path: Path, phantoms: Path) -> None:
    run = tmp_path / "run"
    result = train_vqgan(run, small_cfg(), data=phantoms, device="cpu")
    assert result.step == 4 and result.bad_steps == 0
    assert {"l1", "vq", "locality", "perplexity", "g_2d", "discriminator"} <= set(result.losses)
    ckpt = load_checkpoint(run / "vqgan", "vqgan")
    assert ckpt is not None and {"model", "disc2d", "disc3d"} <= {
        p.stem for p in ckpt.path.glob("*.safetensors")
    }
    assert sorted(p.name for p in (run / "vqgan" / "previews").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]

    model, meta = load_vqgan(run)
    assert not model.training
    assert meta["preset"] == "tiny" and len(meta["data_hash"]) == 64
    assert meta["latent_scale"] == pytest.approx(list(model.latent_scale()))
    assert meta["latent_shape"] == [8, 4, 16, 16]
    # The held-out numbers in meta and log.jsonl are those of the final weights on the 2 held-out cases.
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.train.data import PreparedBatches, split_indices

    ds = PreparedDataset(phantoms)
    held = PreparedBatches(ds, 2, 0, indices=split_indices(len(ds))[1])
    again = evaluate_reconstruction(model, held)
    assert again["cases"] == meta["heldout_cases"] == 1 and meta["heldout"]["step"] == 4
    assert meta["heldout"]["l1"] == pytest.approx(again["l1"], rel=1e-5)
    evals = [r for r in json.loads("[" + ",".join((run / "log.jsonl").read_text().split("\n")[:-1]) + "]")
             if r.get("event") == "eval"]  # fmt: skip
    assert [r["step"] for r in evals] == [2, 4]


def test_evaluate_reconstruction_matches_naive_loops(phantoms: Path) -> None:
    from lad_fast.data.prepared import PreparedDataset

    torch.manual_seed(0)
    model = small_cfg().vqgan
    from lad_fast.models.vqgan import VQGAN

    vq = VQGAN(model).eval()
    ds = PreparedDataset(phantoms)
    got = evaluate_reconstruction(
        vq, ds, organs=("pancreas+pancreatic_lesion", "spleen", "aorta"), batch_size=4
    )
    l1, boxes = [], {"p": [], "s": [], "a": []}
    for i in range(len(ds)):
        x = torch.from_numpy(np.asarray(ds[i]["image"], np.float32))[None, None]
        with torch.no_grad():
            r = vq.decode(vq.encode(x))[0, 0].numpy()
        err = np.abs(x[0, 0].numpy() - r)
        l1.append(err.mean())
        mask = np.asarray(ds[i]["mask"])
        for key, ids in (("p", (5, 6)), ("s", (2,)), ("a", (9,))):
            where = np.argwhere(np.isin(mask, ids))
            if len(where):
                lo, hi = where.min(0), where.max(0) + 1
                boxes[key].append(err[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].mean())
    assert got["cases"] == len(ds)
    assert got["l1"] == pytest.approx(float(np.mean(l1)), rel=1e-5)
    for key, name in (("p", "pancreas+pancreatic_lesion"), ("s", "spleen"), ("a", "aorta")):
        assert got["box_cases"][name] == len(boxes[key]) > 0
        assert got["box_l1"][name] == pytest.approx(float(np.mean(boxes[key])), rel=1e-5)


# ------------------------------------------------------------------------------------------ SIGKILL

# The CLI in a subprocess, with the `tiny` preset swapped for small_cfg (the CLI takes presets by name).
# LAD_FAST_TEST_SLEEP slows every batch so the kill lands mid-run.
WORKER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_vqgan_train import small_cfg
from lad_fast import config
from lad_fast.train import vqgan
cfg = small_cfg(steps={steps}, checkpoint_every=3, preview_every=4, log_every=2)
config.PRESETS["tiny"] = lambda: cfg
delay = float(os.environ.get("LAD_FAST_TEST_SLEEP", "0"))
if delay:
    call = vqgan.VQBatches.__call__
    def slow(self, *a):
        time.sleep(delay)
        return call(self, *a)
    vqgan.VQBatches.__call__ = slow
from lad_fast.cli.app import main
main(sys.argv[1:])
"""
STEPS = 12


def _cli(run: Path, data: Path, *extra: str, sleep: float = 0.0) -> subprocess.Popen:
    code = WORKER.format(tests=str(Path(__file__).parent), steps=STEPS)
    env = {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1", "LAD_FAST_TEST_SLEEP": str(sleep)}
    cmd = [sys.executable, "-c", code, "train", "vqgan", "--run", str(run), "--data", str(data), *extra]
    cmd += ["--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "vqgan", "vqgan")
    assert ckpt is not None and ckpt.step == STEPS
    return {f"{s}.{k}": v for s in ("model", "disc2d", "disc3d") for k, v in ckpt.tensors(s).items()}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_cli_sigkill_then_resume_matches_uninterrupted(tmp_path: Path, phantoms: Path) -> None:
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = _cli(killed, phantoms, sleep=0.3)
    reference = _cli(full, phantoms)
    from _shared import kill_after_first_checkpoint  # here: the CLI subprocess imports this module

    at_kill = kill_after_first_checkpoint(proc, killed / "vqgan", "vqgan")
    assert 3 <= at_kill < STEPS  # killed mid-run, after the first checkpoint

    resumed = _cli(killed, phantoms, "--resume")
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert f"vqgan: {STEPS} steps" in out
    out = reference.communicate(timeout=120)[0]
    assert reference.returncode == 0, out

    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and any(k.startswith("disc2d.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on CPU
    # The resumed log holds each step once, as the uninterrupted one does.
    steps = [
        r["step"] for r in map(json.loads, (killed / "log.jsonl").read_text().splitlines()) if "losses" in r
    ]
    assert steps == list(range(2, STEPS + 1, 2))


# ------------------------------------------------------------------------------------------ bad input


def test_dataset_of_another_preset_is_refused_before_writing(tmp_path: Path, phantoms: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(phantoms, other)
    index = json.loads((other / "index.json").read_text())
    index["preset"] = "lad"
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"prepared at preset 'lad', but 'tiny' is needed"):
        train_vqgan(tmp_path / "run", small_cfg(), data=other, device="cpu")
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, phantoms: Path, capsys) -> None:
    from lad_fast.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "vqgan", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no index.json; not a prepared dataset" in err


@pytest.fixture()
def trained(tmp_path: Path, phantoms: Path) -> Path:
    run = tmp_path / "run"
    train_vqgan(run, small_cfg(steps=2, preview_every=0), data=phantoms, device="cpu")
    return run


def test_corrupt_checkpoint_on_resume(trained: Path, phantoms: Path) -> None:
    weights = trained / "vqgan" / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = _snapshot(trained)
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or damaged"):
        train_vqgan(trained, small_cfg(steps=4, preview_every=0), data=phantoms, resume=True, device="cpu")
    assert _snapshot(trained) == before
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        load_vqgan(trained)


def test_resume_with_changed_model_config(trained: Path, phantoms: Path) -> None:
    before = _snapshot(trained)
    cfg = small_cfg(steps=4)
    cfg = replace(cfg, vqgan=replace(cfg.vqgan, codebook_size=64))
    with pytest.raises(
        CheckpointError, match=r"created with another config \(vqgan.codebook_size: 32 -> 64\)"
    ):
        train_vqgan(trained, cfg, data=phantoms, resume=True, device="cpu")
    assert _snapshot(trained) == before


def test_resume_on_other_data(trained: Path, phantoms: Path, cache: Path) -> None:
    """The dataset's hash reaches the loop, which refuses to resume on other data (its refusals without
    --resume or --force are tested once, in test_loop.py)."""
    from lad_fast.data.cache import phantom_dataset

    before = _snapshot(trained)
    other = phantom_dataset("tiny", n=6, seed=1)
    with pytest.raises(CheckpointError, match=r"trained on another dataset"):
        train_vqgan(trained, small_cfg(steps=4), data=other, resume=True, device="cpu")
    assert _snapshot(trained) == before


def test_run_folder_holding_another_model(trained: Path, tmp_path: Path, phantoms: Path) -> None:
    from _shared import rewrite_meta  # here: the CLI subprocess imports this module

    meta_path = trained / "vqgan" / "step-00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = "segmenter"
    rewrite_meta(meta_path, meta)
    before = _snapshot(trained)
    with pytest.raises(CheckpointError, match=r"holds a 'segmenter' checkpoint, not 'vqgan'"):
        train_vqgan(trained, small_cfg(steps=4), data=phantoms, resume=True, device="cpu")
    with pytest.raises(CheckpointError, match=r"holds a 'segmenter' checkpoint"):
        load_vqgan(trained)
    assert _snapshot(trained) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"is not a lad-fast run"):
        train_vqgan(foreign, small_cfg(), data=phantoms, device="cpu")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_load_vqgan_without_checkpoint(tmp_path: Path) -> None:
    from lad_fast.runs.rundir import RunDir

    RunDir.create(tmp_path / "empty", small_cfg())
    with pytest.raises(
        CheckpointError,
        match=r"has no trained VQ-GAN \(no complete checkpoint in .*vqgan\); "
        r"train one with `lad-fast train vqgan --run",
    ):
        load_vqgan(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ lad preset


def test_lad_preset_size_latent_and_one_training_step(tmp_path: Path, monkeypatch) -> None:
    """The documented parameter count and the 8x8x64x64 latent of 32x256x256; one training step of the
    lad models on CPU (batch 1) at a 16x64x64 geometry: the same networks and losses, a quarter of the
    test's former minute (the full-size step's memory is lad-fast plan's, tests/train/test_plan.py)."""
    from lad_fast.data.phantom.draw import write_phantoms
    from lad_fast.data.prepare import prepare_dataset
    from lad_fast.models.vqgan import VQGAN

    cfg = get_preset("lad")
    torch.manual_seed(0)
    model = VQGAN(cfg.vqgan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 736_073  # models/vqgan.py
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 1, 32, 256, 256)).shape == (1, 8, 8, 64, 64)
    del model

    cfg = replace(cfg, geometry=replace(cfg.geometry, shape=(16, 64, 64)))
    write_phantoms(tmp_path / "raw", n=2, cfg=cfg.phantom, seed=0)
    prepare_dataset(tmp_path / "raw", tmp_path / "prepared", cfg)
    cfg = replace(
        cfg, vqgan_train=replace(cfg.vqgan_train, steps=1, batch_size=1, checkpoint_every=1, preview_every=0)
    )
    result = train_vqgan(tmp_path / "run", cfg, data=tmp_path / "prepared", device="cpu")
    assert result.step == 1 and result.bad_steps == 0 and np.isfinite(result.losses["l1"])
    _, meta = load_vqgan(tmp_path / "run")
    assert meta["latent_shape"] == [8, 4, 16, 16] and meta["preset"] == "lad"


def test_holdout_flag_sets_prints_and_keeps_the_split(tmp_path: Path, phantoms: Path, capsys) -> None:
    from lad_fast.errors import ConfigError

    run = tmp_path / "run"
    cfg = small_cfg(steps=2, preview_every=0)
    train_vqgan(run, cfg, data=phantoms, device="cpu", holdout=0.5, stop_at=1)
    assert "vqgan: 6 cases, 3 held out (--holdout 0.5), 3 trained on" in capsys.readouterr().err
    meta = load_checkpoint(run / "vqgan", "vqgan").meta["extra"]
    assert meta["holdout"] == 0.5 and meta["heldout_cases"] == 3 and meta["train_cases"] == 3
    # a resumed run keeps its split: another --holdout is refused, none takes the checkpoint's
    with pytest.raises(ConfigError, match=r"trained with --holdout 0.5; resume with the same fraction"):
        train_vqgan(run, cfg, data=phantoms, device="cpu", holdout=0.2, resume=True)
    train_vqgan(run, cfg, data=phantoms, device="cpu", resume=True)
    assert "3 held out (--holdout 0.5)" in capsys.readouterr().err
    assert load_checkpoint(run / "vqgan", "vqgan").meta["extra"]["heldout_cases"] == 3

    train_vqgan(tmp_path / "none", cfg, data=phantoms, device="cpu", holdout=0, stop_at=1)
    err = capsys.readouterr().err
    assert "vqgan: 6 cases, evaluated on the training cases (--holdout 0), 6 trained on" in err
    with pytest.raises(ConfigError, match=r"--holdout must be a fraction in \[0, 1\), got 1.0"):
        train_vqgan(tmp_path / "bad", cfg, data=phantoms, device="cpu", holdout=1.0)
    assert not (tmp_path / "bad").exists()


def test_cli_holdout_is_an_option_of_train_and_train_vqgan(tmp_path: Path, phantoms: Path, capsys) -> None:
    from lad_fast.cli.app import main

    for cmd in (["train"], ["train", "vqgan"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--data", str(phantoms), "--run", str(tmp_path / "r"), "--holdout", "-0.1"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err  # refused before anything (the pipeline's phantoms, phase 1)
        assert err == "lad-fast: error: --holdout must be a fraction in [0, 1), got -0.1\n"
