"""``lad-fast export``: a trained run's denoiser step and decoder as ONNX graphs and TensorRT engines."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Target(str, Enum):
    onnx = "onnx"
    trt = "trt"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def export(
    run: Annotated[
        str | None,
        typer.Option("--run", "-r", help="Trained run (name under ./runs or folder). Default: latest."),
    ] = None,
    target: Annotated[
        Target, typer.Option(help="onnx: ONNX graphs; trt: also TensorRT engines (NVIDIA GPU).")
    ] = Target.onnx,
    precision: Annotated[
        Precision,
        typer.Option(help="fp32 graphs only, or also an fp16/bf16 variant (ModelOpt AutoCast)."),
    ] = Precision.fp16,
    batch_range: Annotated[
        str, typer.Option("--batch-range", help="MIN:OPT:MAX volumes per sampler call (engine profile).")
    ] = "1:4:16",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder. Default: RUN/export.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an earlier export in --out (deletes only files it wrote)."),
    ] = False,
) -> None:
    """Export the denoiser step and the VQ-GAN decoder as ONNX graphs (and TensorRT engines with trt)."""
    from lad_fast.cli.options import resolve_run
    from lad_fast.export.artefacts import BatchRange
    from lad_fast.export.run_export import export_run
    from lad_fast.runs.rundir import latest_run

    brange = BatchRange.parse(batch_range)  # before the run is opened: a typo costs nothing
    if run:
        run_path = resolve_run(run)
    else:
        run_path = latest_run()
        typer.echo(f"lad-fast: using run {run_path} (the latest complete run)", err=True)
    written = export_run(run_path, out, target=target.value, precision=precision.value,
                         batch_range=brange, force=force)  # fmt: skip
    for path in written:
        if path.suffix != ".json":
            typer.echo(str(path))
