"""Structure-condition speed: gudhi reference vs the fast CPU path (and the torch GPU path on CUDA).

Runs side by side on the official Lad reference case (32x256x256, classes 0/1/2), checks the results
agree bit for bit, prints a table and appends one JSON line to bench/results/topology.jsonl.

    python bench/bench_topology.py [--repeats 20] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import gudhi
import numpy as np
import scipy
import torch

from lad_fast.conditioning.topology import lad_structure_vector, lad_structure_vector_gudhi
from lad_fast.utils.atomic import append_line

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    ref = args.data / "lad_reference"
    mask = np.load(ref / "Case_00001_mask.npy")
    official = np.load(ref / "Case_00001_topo.npy")

    t = time.perf_counter()
    slow = lad_structure_vector_gudhi(mask)  # ~10 s: one run
    t_gudhi = time.perf_counter() - t
    fast = lad_structure_vector(mask, impl="numpy")
    assert np.array_equal(slow, official) and np.array_equal(fast, official), "results disagree"
    t_fast = best_of(lambda: lad_structure_vector(mask, impl="numpy"), args.repeats)

    rows = [("gudhi (reference)", t_gudhi, 1.0), ("numpy fast path (CPU)", t_fast, t_gudhi / t_fast)]
    gpu = None
    if torch.cuda.is_available():
        cuda_mask = torch.from_numpy(mask).cuda()
        assert np.array_equal(lad_structure_vector(cuda_mask), official), "GPU path disagrees"

        def run_gpu() -> None:
            lad_structure_vector(cuda_mask)
            torch.cuda.synchronize()

        t_gpu = best_of(run_gpu, args.repeats)
        gpu = {"device": torch.cuda.get_device_name(), "seconds": t_gpu, "vs_cpu_fast": t_fast / t_gpu}
        rows.append((f"torch GPU path ({gpu['device']})", t_gpu, t_gudhi / t_gpu))
    else:
        print("no CUDA device here: GPU path not benchmarked")

    print(f"structure vector of a {'x'.join(map(str, mask.shape))} mask, classes (0, 1, 2)")
    print(f"{'path':<40} {'seconds':>10} {'x gudhi':>10}")
    for name, sec, ratio in rows:
        print(f"{name:<40} {sec:>10.4f} {ratio:>10.1f}")

    record = {
        "bench": "topology",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "gudhi": gudhi.__version__,
            "torch": torch.__version__,
        },
        "shape": list(mask.shape),
        "classes": [0, 1, 2],
        "gudhi_s": round(t_gudhi, 4),
        "fast_cpu_s": round(t_fast, 6),
        "ratio_fast_vs_gudhi": round(t_gudhi / t_fast, 1),
        "gpu": gpu if gpu is not None else "skipped: no CUDA device",
        "bit_exact": True,
    }
    append_line(ROOT / "bench" / "results" / "topology.jsonl", json.dumps(record))


if __name__ == "__main__":
    main()
