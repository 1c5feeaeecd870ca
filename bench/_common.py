"""Helpers shared by the kernel benchmarks ``bench/bench_<op>.py``: dtype names, the CUDA check, timing,
peak memory, the environment record and the results file.

The scripts import this module as ``_common``: running ``python bench/bench_<op>.py`` puts ``bench/`` on
``sys.path``, and ``lad-fast bench kernels`` does the same before it loads them.
"""

from __future__ import annotations

import datetime
import json
import platform
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
    """Median time of one call of ``fn`` in milliseconds (Triton's ``do_bench``: CUDA events, L2 flushed).

    ``grad_to_none``: tensors whose ``.grad`` is reset before every run, so that a timed backward does
    not also time the accumulation into an existing gradient.
    """
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def peak_extra_mib(fn: Callable[[], Any]) -> float:
    """Peak memory one call of ``fn`` allocates beyond what was live before it, in MiB."""
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
    """Device and versions recorded with every result line."""
    import triton

    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }


def append_result(op: str, record: dict[str, Any]) -> Path:
    """Append one JSON line to ``bench/results/<op>.jsonl`` (fsynced); returns the file."""
    from lad_fast.utils.atomic import append_line

    path = RESULTS_DIR / f"{op}.jsonl"
    append_line(path, json.dumps(record))
    return path
