"""SIGKILL a training process after its first checkpoint, resume it, and match an uninterrupted run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _shared import kill_after_first_checkpoint

from lad_fast.runs.checkpoints import load_checkpoint

WORKER = Path(__file__).with_name("toy_train.py")
STEPS = 40


def _worker(run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), str(run), "--steps", str(STEPS), "--checkpoint-every", "10", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "segmenter", "segmenter")
    assert ckpt is not None and ckpt.step == STEPS
    return {**ckpt.tensors("model"), **{f"ema.{k}": v for k, v in ckpt.tensors("ema").items()}}


def _load_toy():
    spec = importlib.util.spec_from_file_location("lad_fast_test_toy_train", WORKER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    # Sleep in the data function so that the run is still going when the first checkpoint appears.
    proc = _worker(killed, "--sleep", "0.05")
    # Meanwhile, the uninterrupted reference in this process, with the worker's settings (one thread,
    # so the reduction order matches).
    toy = _load_toy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy.run_toy(tmp_path / "full", toy.toy_cfg(steps=STEPS, checkpoint_every=10, ema_decay=0.9))
    finally:
        torch.set_num_threads(threads)
    at_kill = kill_after_first_checkpoint(proc, killed / "segmenter", "segmenter")
    assert 10 <= at_kill < STEPS  # killed mid-run, after (at least) the first checkpoint

    resumed = _worker(killed, "--resume")
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out

    a, b = _weights(tmp_path / "full"), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on CPU
