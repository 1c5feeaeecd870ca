"""``bench/gpu_suite.sh --cpu-dry-run``: the prepared GPU check runs all its steps at tiny shapes on a
CPU (Triton interpreter), so the script that will run on the first GPU cannot rot unnoticed.

The dry run takes about a minute of CPU time (most of it the interpreted training steps), so it runs
once per module. On a CUDA machine the test is skipped: there the suite runs for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STEPS = ["install", "env", "topology", "sampler", "pytest", "kernels", "compile", "calibrate", "train"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite itself runs")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {k: v for k, v in os.environ.items() if k != "LAD_FAST_KERNELS"}
    env["PYTHON"] = sys.executable  # this interpreter, whether or not its venv is activated
    done = subprocess.run(
        ["bash", str(SUITE), "--cpu-dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return done, out


def test_dry_run_passes_every_step(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = _lines(out / "steps.jsonl")
    assert [s["step"] for s in steps] == STEPS
    assert all(s["dry_run"] for s in steps)
    # The sampler benchmark belongs to another command: skipped with a logged reason when it is missing.
    assert all(s["status"] == "ok" or (s["step"] == "sampler" and s["status"] == "skipped") for s in steps)
    assert (out / "suite.log").read_text().count("ok in") >= 6


def test_results_carry_device_versions_and_both_paths(dry_run):
    _, out = dry_run
    env = _lines(out / "env.jsonl")
    assert env and all(env[0][k] for k in ("device", "torch", "triton", "python", "when"))

    kernels = _lines(out / "kernels.jsonl")
    assert all(r["device"] == env[0]["device"] and r["torch"] == env[0]["torch"] for r in kernels)
    seen = {(r["op"], r["pass"]) for r in kernels}
    for op in ("norm_act_conv3d", "norm_act_conv3d[prologue]", "conv3d", "attention"):
        assert {(op, "fwd"), (op, "fwd+bwd")} <= seen, op
    assert ("vq_nearest", "fwd") in seen
    assert all(r["ms"] > 0 and r["ref_ms"] > 0 and r["max_abs_err_fwd"] < 1e-4 for r in kernels)

    records = _lines(out / "train.jsonl")
    train = [r for r in records if r.get("kind") != "calibrate"]
    by = {(r["model"], r["impl"]): r for r in train}
    assert set(by) == {(m, i) for m in ("vqgan", "unet") for i in ("torch", "triton")}
    for model in ("vqgan", "unet"):  # one step from the same weights: the same loss on both paths
        assert by[(model, "triton")]["loss"] == pytest.approx(by[(model, "torch")]["loss"], rel=1e-5)

    # The plan's calibration: the segmenter's real step beside its plan (memory is measured on a GPU only).
    (calib,) = [r for r in records if r.get("kind") == "calibrate"]
    assert "error" not in calib, calib["error"]
    assert calib["model"] == "segmenter" and calib["planned_peak_mib"] > 1 and calib["measured_step_ms"] > 0

    (topo,) = _lines(out / "topology.jsonl")
    assert topo["equal"] is True
    if (out / "sampler.jsonl").exists():  # written only when the command is missing
        assert "does not exist" in _lines(out / "sampler.jsonl")[0]["skipped"]
    assert len(list(out.iterdir())) <= 8  # the device tool brings back eight files at most


def test_unknown_option_is_refused():
    done = subprocess.run(["bash", str(SUITE), "--gpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown option '--gpu'" in done.stdout
