"""``lad-fast plan``: what a preset costs on a GPU (memory, FLOPs, time), predicted without a GPU."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from lad_fast.cli.options import Preset, PresetOpt

BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch", "-b", help="Batch of every training step and of sampling (default: the preset's).", min=1
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="a100-40, a100-80, h100, h200, l40s, rtx4090, or a memory size in GiB (memory only, no times); "
        "default: all of the named ones.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")]


def plan(
    preset: PresetOpt = Preset.lad, batch: BatchOpt = None, gpu: GpuOpt = None, as_json: JsonOpt = False
) -> None:
    """Predict, without allocating anything, each model's training step (peak memory, FLOPs, step time,
    the largest batch, hours for the budget) and generation (sampling and decode memory, volumes per
    hour) on a GPU, from a trace of the step on fake tensors."""
    from lad_fast.config import get_preset
    from lad_fast.train.plan import plan_report
    from lad_fast.utils.gpu_specs import parse_gpu

    gpus = [parse_gpu(gpu)] if gpu else []
    report = plan_report(get_preset(preset.value), batch, gpus)
    typer.echo(json.dumps(report, indent=1) if as_json else render(report))


def _num(x: Any, fmt: str = "") -> str:
    """A table cell: "-" for a missing value, numbers in ``fmt``, anything else as it is."""
    if x is None:
        return "-"
    return format(x, fmt) if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _by(by: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in by.items())


def render(report: dict[str, Any]) -> str:
    """The plan as text: one table per part, every number labelled predicted."""
    a = report["assumptions"]
    gpus = list(report["gpus"])
    lines = [
        f"lad-fast plan, preset {report['preset']}: PREDICTED (fake-tensor trace, not measured on a GPU)",
        f"  traced: {a['traced']}",
        f"  fits: the peak is at most {a['fit_fraction']:.0%} of the GPU's memory",
        f"  time: per-op roofline at {a['math_efficiency']:.0%} of the {a['rate']} and "
        f"{a['bandwidth_efficiency']:.0%} of peak bandwidth (fp32 steps reach half that rate at best: TF32)",
        "",
        "training step (predicted)   batch  parameters  optimiser  precision  compile  peak GiB  TFLOP/step",
    ]
    for t in report["training"]:
        precision = "fp32" if t["amp"] == "none" else t["amp"]
        compiled = "on" if t["compile"] else "off"
        lines.append(
            f"  {t['model']:<25} {t['batch']:>5}  {t['parameters'] / 1e6:>8.2f} M  {t['optimizer']:<9}  "
            f"{precision:<9}  {compiled:<7}  {t['peak_gib']:>8.3g}  {t['tflop_per_step']:>10.3g}"
        )
        lines.append(f"    peak GiB: {_by(t['peak_by_gib'])}")
    width = max(10, *(len(g) + 2 for g in gpus))
    head = "".join(f"{g:>{width}}" for g in gpus)
    lines += ["", f"largest batch that fits (predicted){'':<2}{head}"]
    for t in report["training"]:
        row = "".join(f"{t['per_gpu'][g]['largest_batch']:>{width}}" for g in gpus)
        lines.append(f"  {t['model']:<35}{row}")
    lines += ["", f"step time s | hours for the budget{'':<4}{head}"]
    for t in report["training"]:
        times = "".join(f"{_num(t['per_gpu'][g]['step_s'], '.3f'):>{width}}" for g in gpus)
        hours = "".join(f"{_num(t['per_gpu'][g]['hours'], '.1f'):>{width}}" for g in gpus)
        lines.append(f"  {t['model']:<35}{times}")
        lines.append(f"  {'':<10}{t['steps']:>9} steps, hours{'':<4}{hours}")
    g = report["generate"]
    lines += [
        "",
        f"generate (predicted): {g['sampler']}, {g['steps']} steps, guidance {g['guidance']:g}: "
        f"{g['unet_calls']} U-Net calls of batch {g['unet_batch']} per batch of {g['batch']} volumes",
        f"  sampling peak {g['sampling_peak_gib']:.3g} GiB ({_by(g['sampling_peak_by_gib'])}); "
        f"{g['tflop_per_batch']:.3g} TFLOP per batch",
        f"  decode of one volume: whole {g['decode_whole_gib']:.3g} GiB, tiles of {g['decode_tile']}: "
        f"{g['decode_tiled_gib']:.3g} GiB; sampling beside a whole decode {g['peak_gib']:.3g} GiB",
        f"  {'':<33}{head}",
    ]
    for key, label, fmt in (("largest_batch", "largest batch", ""), ("decode", "decode", ""),
                            ("volumes_per_hour", "volumes per hour", ".0f")):  # fmt: skip
        row = "".join(f"{_num(g['per_gpu'][n][key], fmt):>{width}}" for n in gpus)
        lines.append(f"  {label:<33}{row}")
    return "\n".join(lines)
