"""The predicted GPU table of ``lad-fast plan`` for the ``lad`` and ``lad-official`` presets.

Runs ``lad-fast plan --preset P --json`` (a fake-tensor trace: no GPU needed, nothing allocated) and writes
``bench/results/plan_predicted.md`` (per model: peak GiB at the preset's batch, the largest batch that fits,
step time and hours for the step budget, on one H100 and one A100-40; and generation) beside the JSON
reports in ``plan_predicted.json``. Every number is a prediction until a GPU run measures it.

    python bench/plan_check.py [--presets lad lad-official] [--gpus h100 a100-40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def plan(preset: str) -> tuple[dict[str, Any], float]:
    """``lad-fast plan --preset preset --json`` and its wall time in seconds."""
    code = "from lad_fast.cli.app import main; main()"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, "plan", "--preset", preset, "--json"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"lad-fast plan --preset {preset} failed: {out.stderr.strip()}")
    return json.loads(out.stdout), time.perf_counter() - t0


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x >= 0.1 else f"{x:.2f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"


def markdown(reports: list[dict[str, Any]], gpus: list[str]) -> str:
    """One table per preset: training per model, then generation, columns per GPU."""
    a = reports[0]["assumptions"]
    lines = [
        "# Predicted on one H100 / A100-40 (lad-fast plan)",
        "",
        "**Predicted, not measured**: `lad-fast plan` traces one step of each model on fake tensors "
        "(nothing allocated) on the CUDA kernel path; no GPU has run these yet. Memory is the peak of live "
        f"tensors; a batch fits when that peak is at most {a['fit_fraction']:.0%} of the GPU's memory. Time "
        f"is a per-op roofline at {a['math_efficiency']:.0%} of the peak dense bf16 tensor-core rate and "
        f"{a['bandwidth_efficiency']:.0%} of peak memory bandwidth, for an eager step (torch.compile, which "
        "the presets turn on, is not modelled). The presets train in fp32, which reaches at best half the "
        "bf16 rate (TF32), so these times are optimistic by up to 2x where math bounds the step.",
        "",
    ]
    for r in reports:
        head = " | ".join(f"{g} largest batch | {g} step | {g} hours" for g in gpus)
        lines += [
            f"## `{r['preset']}`",
            "",
            f"| model | batch | peak GiB | TFLOP / step | steps | {head} |",
            "|---|---:|---:|---:|---:|" + "---:|" * (3 * len(gpus)),
        ]
        for t in r["training"]:
            cells = " | ".join(
                f"{t['per_gpu'][g]['largest_batch']} | {_s(t['per_gpu'][g]['step_s'])} | "
                f"{_h(t['per_gpu'][g]['hours'])}"
                for g in gpus
            )
            lines.append(
                f"| {t['model']} | {t['batch']} | {t['peak_gib']:.2f} | {t['tflop_per_step']:.2f} | "
                f"{t['steps']:,} | {cells} |"
            )
        g = r["generate"]
        per = " | ".join(
            f"{g['per_gpu'][n]['largest_batch']} | {g['per_gpu'][n]['decode']} | "
            f"{g['per_gpu'][n]['volumes_per_hour'] or 0:,.0f} vol/h"
            for n in gpus
        )
        lines += [
            "",
            f"generate ({g['sampler']}, {g['steps']} steps, guidance {g['guidance']:g}; U-Net batch "
            f"{g['unet_batch']} per batch of {g['batch']}): sampling peak {g['sampling_peak_gib']:.2f} GiB, "
            f"decode of one volume {g['decode_whole_gib']:.2f} GiB whole, {g['decode_tiled_gib']:.2f} GiB in "
            f"tiles of {g['decode_tile']}; both resident {g['peak_gib']:.2f} GiB.",
            "",
            "| " + " | ".join(f"{n} largest batch | {n} decode | {n} predicted" for n in gpus) + " |",
            "|" + "---:|" * (3 * len(gpus)),
            f"| {per} |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["lad", "lad-official"])
    ap.add_argument("--gpus", nargs="+", default=["h100", "a100-40"])
    args = ap.parse_args()
    reports, seconds = [], {}
    for preset in args.presets:
        report, s = plan(preset)
        reports.append(report)
        seconds[preset] = round(s, 1)
        print(f"{preset}: planned in {s:.1f} s (one process: imports, then every trace)")
    text = markdown(reports, args.gpus)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_predicted.md").write_text(text + "\n", encoding="utf-8")
    import torch

    record = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": "predicted",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "plan_seconds": seconds,
        "reports": reports,
    }
    (RESULTS / "plan_predicted.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
