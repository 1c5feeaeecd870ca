"""Organ segmenter on `tiny` phantoms: train within a wall-clock budget, then held-out per-organ Dice.

Issue 3 target: at most 15 minutes of training on two CPU cores reaches Dice >= 0.9 on liver, spleen and
both kidneys and >= 0.7 on pancreas, on held-out phantoms. The run trains the `tiny` preset's segmenter
(lad_fast/config.py) on ``--n`` cached phantoms (80 % train, 20 % held out by
lad_fast.train.data.split_indices) in chunks of ``--chunk`` steps (``stop_at`` + ``resume``, so the
weights equal one uninterrupted run); it stops early when the next chunk would overrun ``--budget-s``.
Results: bench/results/segmenter.json (Dice per organ, wall time, steps, device, load, versions, command)
and docs/segmenter_prediction.png (a held-out phantom: true outlines above, predicted below).

    python bench/bench_segmenter.py [--n 64] [--budget-s 900] [--steps N] [--run /tmp/seg-bench]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"liver": 0.9, "spleen": 0.9, "kidney_right": 0.9, "kidney_left": 0.9, "pancreas": 0.7}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="phantoms (the last 20 %% are held out)")
    parser.add_argument("--budget-s", type=float, default=900.0, help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--chunk", type=int, default=20, help="steps between budget checks")
    parser.add_argument("--run", type=Path, default=Path("/tmp/lad-fast-bench-segmenter"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "segmenter.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "segmenter_prediction.png")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from lad_fast.config import config_to_dict, get_preset
    from lad_fast.data.cache import phantom_dataset
    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.runs.loading import load_segmenter, predict_volumes
    from lad_fast.train.segmenter import (
        evaluate_segmenter,
        labelled_split,
        render_prediction,
        train_segmenter,
    )
    from lad_fast.utils.atomic import atomic_path, write_json

    cfg = get_preset("tiny")
    steps = args.steps or cfg.segmenter_train.steps
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    data = phantom_dataset("tiny", n=args.n)
    data_s = time.perf_counter() - t0
    if args.run.exists():
        shutil.rmtree(args.run)

    t_train = time.perf_counter()
    done, chunk_s = 0, 0.0
    while done < steps:
        t_chunk = time.perf_counter()
        stop = min(steps, done + args.chunk)
        result = train_segmenter(
            args.run, cfg, data=data, steps=steps, resume=done > 0, device="cpu", stop_at=stop
        )
        done = result.step
        chunk_s = max(chunk_s, time.perf_counter() - t_chunk)
        elapsed = time.perf_counter() - t_train
        print(
            f"step {done}/{steps}  {elapsed:.0f} s  loss {result.losses.get('model', float('nan')):.4f}",
            flush=True,
        )
        if done < steps and elapsed + chunk_s * min(1.0, (steps - done) / args.chunk) > args.budget_s:
            print(f"stopping: the next chunk would overrun the {args.budget_s:.0f} s budget", flush=True)
            break
    train_s = time.perf_counter() - t_train
    load_during = os.getloadavg()

    dataset = PreparedDataset(data)
    _, val_idx = labelled_split(dataset)
    net, meta = load_segmenter(args.run)
    t_eval = time.perf_counter()
    scores = evaluate_segmenter(net, dataset, val_idx, "cpu")
    eval_s = time.perf_counter() - t_eval

    case = val_idx[0]
    item = dataset[case]
    pred = predict_volumes(net, np.asarray(item["image"])[None], "cpu")[0]
    title = f"held-out {dataset.case_ids[case]}"
    image = render_prediction(item["image"], pred, item["mask"], dataset.geometry, title)
    with atomic_path(args.png, suffix=".png") as tmp:
        image.save(tmp, format="PNG")

    passed = {organ: scores["dice"].get(organ, 0.0) >= t for organ, t in TARGETS.items()}
    record = {
        "bench": "segmenter",
        "preset": "tiny",
        "phantoms": args.n,
        "train_cases": len(dataset) - len(val_idx),
        "held_out_cases": len(val_idx),
        "steps": done,
        "steps_planned": steps,
        "batch_size": cfg.segmenter_train.batch_size,
        "train_wall_s": round(train_s, 1),
        "budget_s": args.budget_s,
        "data_s": round(data_s, 1),
        "eval_s": round(eval_s, 1),
        "dice": scores["dice"],
        "dice_pooled": scores["dice_pooled"],
        "targets": TARGETS,
        "passed": passed,
        "all_passed": all(passed.values()),
        "segmenter": config_to_dict(cfg.segmenter),
        "segmenter_train": config_to_dict(cfg.segmenter_train),
        "device": "cpu",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after_training": [round(v, 2) for v in load_during],
        },
        "versions": {k: v for k, v in meta.items() if k in ("lad_fast", "torch", "python")}
        | {"numpy": np.__version__},
        "command": " ".join(["python", *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(args.out, record)
    print(f"{'organ':<14}{'dice':>8}{'target':>8}")
    for organ, value in scores["dice"].items():
        target = TARGETS.get(organ)
        print(f"{organ:<14}{value:>8.3f}{'' if target is None else f'{target:>8.2f}'}")
    print(
        f"trained {done} steps in {train_s:.0f} s (load {load_before[0]:.1f} -> {load_during[0]:.1f}); "
        f"wrote {args.out} and {args.png}"
    )
    return 0 if record["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
