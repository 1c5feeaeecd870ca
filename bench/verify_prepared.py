"""What verifying a prepared dataset costs (``PreparedDataset.verify``, run by every training job).

Writes ``--cases`` synthetic cases at the ``lad`` preset geometry (32 x 256 x 256: a float16 image in
[-1, 1], a uint8 mask of canonical ids and its structure vector, with the hashes prepare records) into
a prepared folder, then times ``verify()`` of a freshly opened dataset ``--repeats`` times (the files are
in the page cache, as they are right after ``prepare`` or on a second run). Prints seconds per case and in
total, and appends one JSON line to ``bench/results/verify_prepared.jsonl``.

    python bench/verify_prepared.py --workdir /tmp/verify_bench [--cases 32] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from lad_fast.config import config_to_dict, get_preset
from lad_fast.data.digest import image_hash, mask_hash
from lad_fast.data.integrity import SCHEMA_VERSION
from lad_fast.data.prepared import PreparedDataset
from lad_fast.organs import CANONICAL_ORGANS, NUM_CLASSES


def write_dataset(root: Path, n: int, preset: str = "lad") -> tuple[int, ...]:
    cfg = get_preset(preset)
    shape = tuple(cfg.geometry.shape)
    rng = np.random.default_rng(0)
    cases = []
    for k in range(n):
        case_id = f"case_{k:03d}"
        folder = root / "cases" / case_id
        folder.mkdir(parents=True)
        image = rng.uniform(-1, 1, size=shape).astype(np.float16)
        mask = rng.integers(0, NUM_CLASSES, size=shape, dtype=np.uint8)
        structure = rng.integers(0, 5, size=3 * shape[0] * 2, dtype=np.int64)
        np.save(folder / "image.npy", image)
        np.save(folder / "mask.npy", mask)
        np.save(folder / "structure.npy", structure)
        cases.append(
            {
                "id": case_id,
                "content_hash": "0" * 64,
                "affine": np.eye(4).tolist(),
                "has_mask": True,
                "image_hash": image_hash(image),
                "mask_hash": mask_hash(mask, structure),
            }
        )
    index = {
        "schema_version": SCHEMA_VERSION,
        "preset": preset,
        "geometry": config_to_dict(cfg.geometry),
        "organs": list(CANONICAL_ORGANS),
        "image_dtype": "float16",
        "cases": cases,
    }
    (root / "index.json").write_text(json.dumps(index))
    return shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/results")
    args = ap.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    shape = write_dataset(args.workdir, args.cases)
    times = []
    for _ in range(args.repeats):
        ds = PreparedDataset(args.workdir)  # a fresh object: nothing verified yet
        t0 = time.perf_counter()
        ds.verify()
        times.append(time.perf_counter() - t0)
    best = min(times)
    per_case = best / args.cases
    print(f"{'cases':>6} {'shape':>16} {'total s':>8} {'s/case':>8}")
    print(f"{args.cases:>6} {str(shape):>16} {best:>8.3f} {per_case:>8.4f}")
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cases": args.cases,
        "shape": list(shape),
        "times_s": [round(t, 4) for t in times],
        "best_total_s": round(best, 4),
        "s_per_case": round(per_case, 5),
    }
    if not args.no_write:
        out = Path(__file__).resolve().parent / "results" / "verify_prepared.jsonl"
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
