"""Two CPU processes under torchrun with gloo: each rank's setup, identical weights on both ranks, one log,
exact resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lad_fast.runs.checkpoints import load_checkpoint
from lad_fast.runs.rundir import RunDir

WORKER = Path(__file__).with_name("toy_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1"}
    logs = Path(f"{out}.logs")
    # Each rank's output goes to its own files (--log-dir, --tee): a failure says which rank failed where.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "--log-dir", str(logs), "--tee", "3",
        str(WORKER), str(run), "--steps", "6", "--checkpoint-every", "3", "--out", str(out), *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=180
    )
    if proc.returncode != 0:
        ranks = "".join(f"\n--- {f}\n{f.read_text()[-2000:]}" for f in sorted(logs.rglob("*")) if f.is_file())
        raise AssertionError(f"torchrun exited {proc.returncode}: {proc.stderr[-2000:]}{ranks}")


def _rank_weights(out: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_run_and_resume(tmp_path):
    run, out = tmp_path / "r", tmp_path / "w"
    _torchrun(run, out)
    # The loop set each rank up from torchrun's variables: its own rank and local rank, the CPU it asked
    # for, and, had it asked for CUDA, its own GPU (cuda:LOCAL_RANK).
    setups = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert setups == [
        {"rank": r, "local_rank": r, "world": 2, "device": "cpu", "cuda_choice": f"cuda:{r}"} for r in (0, 1)
    ]
    w0, w1 = _rank_weights(out)
    assert _equal(w0, w1)
    ckpt = load_checkpoint(run / "segmenter", "segmenter")
    assert ckpt.step == 6 and ckpt.state["world"] == 2 and len(ckpt.state["rng_ranks"]) == 2
    assert _equal(ckpt.tensors("model"), w0)
    # One writer: each step logged once, each checkpoint once.
    log = RunDir(run).read_log("segmenter")
    assert [r["step"] for r in log if "losses" in r] == [5, 6]
    assert [r["step"] for r in log if r.get("event") == "checkpoint"] == [3, 6]
    # Each rank keeps its own dropout stream; both are saved and restored, so stop + resume is exact.
    assert not torch.equal(ckpt.state["rng_ranks"][0]["torch"], ckpt.state["rng_ranks"][1]["torch"])
    part, out2 = tmp_path / "part", tmp_path / "w2"
    _torchrun(part, out2, "--stop-at", "3")
    assert load_checkpoint(part / "segmenter", "segmenter").step == 3
    _torchrun(part, out2, "--resume")
    r0, r1 = _rank_weights(out2)
    assert _equal(r0, r1) and _equal(r0, w0)
