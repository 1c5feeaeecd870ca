"""SIGINT / SIGTERM during training: finish the step, checkpoint, say where and how to resume, exit 130 / 143;
the resumed run says where it continues, reaches the uninterrupted weights and logs each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lad_fast.config import get_preset
from lad_fast.runs.checkpoints import load_checkpoint
from lad_fast.runs.rundir import RunDir
from lad_fast.utils.interrupts import Interrupted, deferred, raise_on_signals

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

WORKER = Path(__file__).with_name("toy_train.py")
STEPS = 40


def _env() -> dict[str, str]:
    return {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    # pytest may itself run in the background of a script, where SIGINT is ignored and children inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kw
    )


def _worker(run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(run), "--steps", str(STEPS), "--checkpoint-every", "10", *extra]
    return _popen(cmd, stderr=subprocess.STDOUT)


def _logged_steps(run: Path, model: str) -> list[int]:
    return [r["step"] for r in RunDir(run).read_log(model) if "losses" in r]


def _signal_after_step(proc: subprocess.Popen, run: Path, model: str, step: int, sig: int) -> None:
    """Send ``sig`` once ``log.jsonl`` holds a step line at or past ``step`` (the run is mid-way)."""
    deadline = time.monotonic() + 120
    while not any(s >= step for s in _logged_steps(run, model)):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the run logged nothing in 120 s"
        time.sleep(0.02)
    proc.send_signal(sig)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The toy trained without a stop, in this process with the worker's settings (one thread)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lad_fast_test_toy_train_int", WORKER)
    toy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = toy
    spec.loader.exec_module(toy)
    run = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy.run_toy(run, toy.toy_cfg(steps=STEPS, checkpoint_every=10, ema_decay=0.9))
    finally:
        torch.set_num_threads(threads)
    return _weights(run)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "segmenter", "segmenter")
    assert ckpt is not None and ckpt.step == STEPS
    return {**ckpt.tensors("model"), **{f"ema.{k}": v for k, v in ckpt.tensors("ema").items()}}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_then_resume_matches_uninterrupted(tmp_path, sig, uninterrupted):
    run = tmp_path / "run"
    proc = _worker(run, "--sleep", "0.05")
    _signal_after_step(proc, run, "segmenter", 5, sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + sig, out  # 130 / 143, the shell's convention
    ckpt = load_checkpoint(run / "segmenter", "segmenter")
    assert 5 <= ckpt.step < STEPS  # stopped mid-run, with a checkpoint of the step it had finished
    name = signal.Signals(sig).name
    assert f"{name} received, stopping after the current segmenter step" in out
    assert (
        f"lad-fast: interrupted ({name}): segmenter stopped after step {ckpt.step} of {STEPS}; "
        f"checkpoint {ckpt.path}; to continue, rerun with --resume" in out
    )

    resumed = _worker(run, "--resume")
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert f"segmenter: resuming at step {ckpt.step} of {STEPS} from {ckpt.path}" in out
    steps = _logged_steps(run, "segmenter")
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each step logged once
    got = _weights(run)
    assert got.keys() == uninterrupted.keys()
    for k in got:
        assert torch.equal(got[k], uninterrupted[k]), k  # bit for bit on CPU


def test_resume_without_checkpoint_drops_the_lost_log_lines(tmp_path):
    """A run stopped before its first checkpoint starts over on --resume and says so; the steps it logged
    are logged again, not twice."""
    run = tmp_path / "run"
    RunDir.create(run, get_preset("tiny"))
    RunDir(run).log({"model": "segmenter", "step": 5, "losses": {"model": 1.0}})
    proc = _worker(run, "--resume")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert f"segmenter: no checkpoint in {run / 'segmenter'} to resume; starting at step 0 of {STEPS}" in out
    steps = _logged_steps(run, "segmenter")
    assert steps == sorted(set(steps)) and steps[0] == 5


def _until(done, seconds: float = 5.0) -> None:
    """Poll ``done`` in short sleeps: a signal sent to this process may land on another thread (torch's,
    a finished test's), and Python runs its handler in the main thread only at a later bytecode boundary,
    which a loop reaches and one sleep may not; a loaded machine delays it further."""
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        time.sleep(0.01)


def test_deferred_sets_a_flag_then_a_second_signal_stops_at_once(capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with deferred("after this test") as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        _until(lambda: stop.signum is not None)  # the handler runs at a later bytecode boundary
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGINT)
            _until(lambda: False)
    assert err.value.exit_code == 130 and "stopped at once" in str(err.value)
    assert "SIGTERM received, stopping after this test (again to stop at once)" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back


def test_raise_on_signals_raises_interrupted_not_keyboardinterrupt():
    with pytest.raises(Interrupted) as err, raise_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        _until(lambda: False)
    assert err.value.exit_code == 143 and str(err.value) == "interrupted (SIGTERM)"
    assert not isinstance(err.value, Exception)  # `except Exception` clean-up must not swallow it


def test_continue_command_drops_force_and_adds_resume():
    from lad_fast.cli.app import continue_command

    args = ["train", "--run", "my run", "--force", "--steps", "9"]
    assert continue_command(args, "--resume") == "lad-fast train --run 'my run' --steps 9 --resume"
    assert continue_command([*args, "--resume"], "--resume").count("--resume") == 1
    assert continue_command(["generate", "--n", "4"], "") == "lad-fast generate --n 4"


@pytest.mark.slow
def test_cli_train_sigint_then_sigterm_on_resume(tmp_path, tiny_phantoms):
    """The real command: Typer must not swallow the interrupt; the message names the command to continue,
    the resumed run says where it continues, and log.jsonl never holds a step twice."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lad_fast.cli.app", "train", "vqgan", "--data", str(tiny_phantoms)]
    cmd += ["--run", str(run), "--steps", "500", "--device", "cpu"]
    proc = _popen(cmd, stderr=subprocess.PIPE)
    _signal_after_step(proc, run, "vqgan", 10, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    first = load_checkpoint(run / "vqgan", "vqgan")
    assert 10 <= first.step < 500
    line = [x for x in err.splitlines() if x.startswith("lad-fast: interrupted")]
    assert line == [
        f"lad-fast: interrupted (SIGINT): vqgan stopped after step {first.step} of 500; checkpoint "
        f"{first.path}; to continue: lad-fast train vqgan --data {tiny_phantoms} --run {run} --steps 500 "
        "--device cpu --resume"
    ]

    proc = _popen([*cmd, "--resume"], stderr=subprocess.PIPE)
    _signal_after_step(proc, run, "vqgan", first.step + 10, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert f"vqgan: resuming at step {first.step} of 500 from {first.path}" in err
    second = load_checkpoint(run / "vqgan", "vqgan")
    assert second.step > first.step and f"stopped after step {second.step} of 500" in err
    steps = _logged_steps(run, "vqgan")
    assert steps == sorted(set(steps)), steps
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "resume"] == [first.step]


def _workers(parent: int) -> list[int]:
    """The worker processes torchrun started (its children running the toy script)."""
    kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(k) for k in kids if WORKER.name in Path(f"/proc/{k}/cmdline").read_text(errors="replace")]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_ranks_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    """SIGTERM reaches one rank only: the ranks still agree on the step, save one checkpoint, both stop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port), "--log-dir", str(logs), "--tee", "3",
        str(WORKER), str(run), "--steps", str(STEPS), "--checkpoint-every", "10", "--sleep", "0.05",
    ]  # fmt: skip
    proc = _popen(cmd, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(s >= 5 for s in _logged_steps(run, "segmenter")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the run logged nothing in 120 s"
        time.sleep(0.02)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    proc.communicate(timeout=120)
    ckpt = load_checkpoint(run / "segmenter", "segmenter")
    assert 5 <= ckpt.step < STEPS and ckpt.state["world"] == 2
    outputs = [f.read_text() for f in sorted(logs.rglob("stdout.log"))]
    assert len(outputs) == 2
    for out in outputs:  # each rank stopped after the same step, the one checkpointed
        assert f"interrupted (SIGTERM): segmenter stopped after step {ckpt.step} of {STEPS}" in out, out


def test_cli_interrupt_outside_the_step_loop_still_says_how_to_continue(monkeypatch, capsys, tmp_path):
    import lad_fast.train.pipeline
    from lad_fast.cli.app import main

    def stopped(*args, **kwargs):
        raise Interrupted(signal.SIGINT)  # as raise_on_signals raises it, e.g. while latents are encoded

    monkeypatch.setattr(lad_fast.train.pipeline, "train_pipeline", stopped)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--run", "r", "--force"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err == "lad-fast: interrupted (SIGINT); to continue: lad-fast train --run r --resume\n"
    monkeypatch.setattr("lad_fast.cli.info_cmd.backend_report", stopped)
    with pytest.raises(SystemExit) as exit_:
        main(["info"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "lad-fast: interrupted (SIGINT)\n"
