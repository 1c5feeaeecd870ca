"""Helpers shared by the benchmark scripts in ``bench/``: dtype names, the CUDA check, timing, peak memory,
the environment record, the results file, and the one summary of a ``lad-fast evaluate`` report that
``bench/quality.py`` and ``bench/paper_table.py`` record.

The scripts import this module as ``_common``: running ``python bench/<script>.py`` puts ``bench/`` on
``sys.path``, and ``lad-fast bench kernels`` does the same before it loads them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Canonical names first; the short forms are accepted on every script's command line.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype ("float16"), as results record it."""
    return str(dtype).removeprefix("torch.")


def cuda_missing(script: str) -> bool:
    """True (after saying so) when there is no CUDA GPU: the benchmarks then measure and write nothing."""
    if torch.cuda.is_available():
        return False
    print(f"{script} needs a CUDA GPU (the Triton kernels run there): nothing measured, no result written.")
    return True


def time_ms(
    fn: Callable[[], Any], warmup: int = 25, rep: int = 100, grad_to_none: list[torch.Tensor] | None = None
) -> float:
    """Median time of one call of ``fn`` in milliseconds.

    On CUDA, Triton's ``do_bench`` (CUDA events, L2 flushed; ``warmup`` and ``rep`` in ms). Without CUDA
    the Triton kernels run in the interpreter at seconds per call, so one call is timed with
    ``time.perf_counter`` (the GPU suite's CPU dry run; callers have run ``fn`` once already).
    ``grad_to_none``: tensors whose ``.grad`` is reset before every run, so that a timed backward does
    not also time the accumulation into an existing gradient.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
    for t in grad_to_none or []:
        t.grad = None
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_extra_mib(fn: Callable[[], Any]) -> float | None:
    """Peak memory one call of ``fn`` allocates beyond what was live before it, in MiB (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def environment() -> dict[str, Any]:
    """Device, versions, commit and autotune mode, recorded with every result line.

    Without CUDA the device is the CPU, marked "interpreter" when the Triton kernels run interpreted.
    """
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.cuda.get_device_name()
    else:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        device = f"cpu ({platform.machine()}{', interpreter' if interpreted else ''})"
    try:
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=RESULTS_DIR.parent, capture_output=True, text=True
        )
        commit = git.stdout.strip() or None
    except OSError:  # no git on this machine
        commit = None
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "commit": commit,
        "autotune": os.environ.get("LAD_FAST_AUTOTUNE") or "full",  # "quick": a few configs per kernel
    }


def append_result(op: str, record: dict[str, Any]) -> Path:
    """Append one JSON line to ``bench/results/<op>.jsonl`` (fsynced); returns the file."""
    from lad_fast.utils.atomic import append_line

    path = RESULTS_DIR / f"{op}.jsonl"
    append_line(path, json.dumps(record))
    return path


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one ``lad-fast evaluate`` report that the quality and paper-table benchmarks record.

    One schema for both: realism (``fid``, ``mmd_linear``, ``mmd_gaussian``), ``diversity`` (mean
    pairwise MS-SSIM of the synthetic volumes), mask fidelity (``mask_dice`` against the conditioning
    masks and ``shuffled_mask_dice`` against another volume's mask, both means over organs) and
    structure (``structure_l1``, ``shuffled_structure_l1``: the Betti structure vector's mean absolute
    error), with the run's ``references`` (FID real vs real and of the trivial generator, the real
    ceiling of mask Dice).
    """
    fidelity, realism, refs = report["fidelity"], report["realism"], report["references"]
    return {
        "fid": realism["fid"],
        "mmd_linear": realism["mmd_linear"],
        "mmd_gaussian": realism["mmd_gaussian"],
        "diversity": report["diversity"]["synthetic"],
        "mask_dice": fidelity["synthetic"]["mean_dice"],
        "shuffled_mask_dice": fidelity["shuffled"]["mean_dice"],
        "structure_l1": fidelity["synthetic"]["structure_l1"],
        "shuffled_structure_l1": fidelity["shuffled"]["structure_l1"],
        "references": {
            "fid_real_vs_real": refs["real_vs_real"]["fid"],
            "fid_trivial": refs["trivial"]["fid"],
            "real_ceiling_mask_dice": fidelity["real"]["mean_dice"],
        },
    }
