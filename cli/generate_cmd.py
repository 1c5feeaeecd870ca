"""``lad-fast generate``: synthetic CT volumes with paired masks from a trained run."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lad_fast.cli.options import ForceOpt, SeedOpt
from lad_fast.config import GENERATE_BATCH


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    dpmpp2m = "dpmpp2m"
    euler = "euler"
    heun = "heun"


class Layout(str, Enum):
    default = "default"
    nnunet = "nnunet"


class Backend(str, Enum):
    torch = "torch"
    compile = "compile"
    onnx = "onnx"
    trt = "trt"


# Long only by its option declarations (typer reads them from the signature); the body is the call.
def generate(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (images/, masks/, manifest, dataset.json).")
    ],
    run: Annotated[
        str | None,
        typer.Option("--run", "-r", help="Trained run (name under ./runs or folder). Default: latest."),
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Number of volumes.")] = 8,
    sampler: Annotated[
        Sampler | None,
        typer.Option(
            help="DDPM models: ddpm (all T steps), ddim or dpmpp2m (--steps). Flow models: euler or heun. "
            "Default: the run's preset (tiny and lad: euler; lad-official: ddpm)."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps (at most the model's T). Default: the run's preset.")
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option(help="DDIM only: noise, 0 deterministic (default), 1 stochastic (= DDPM)."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(help="Guidance scale: 0 unconditional, 1 conditional. Default: the run's preset."),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Prepared dataset or folder of NIfTI masks to condition on. Default: the run's data."
        ),
    ] = None,
    augment: Annotated[int, typer.Option(help="Augmented variants per source mask (0: none).")] = 4,
    batch: Annotated[int, typer.Option(help="Volumes per sampler call.")] = GENERATE_BATCH,
    seed: SeedOpt = 0,
    backend: Annotated[Backend, typer.Option(help="Denoiser backend.")] = Backend.torch,
    force: ForceOpt = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    decode_tile: Annotated[
        int | None,
        typer.Option(
            "--decode-tile",
            help="Decode in tiles of N latent voxels per axis (same volumes, less memory); 0: never. "
            "Default: tiles only when the whole decode would not fit in memory.",
        ),
    ] = None,
    layout: Annotated[
        Layout,
        typer.Option(
            help="default: images/ + masks/ (MONAI's list in dataset.json). nnunet: also nnU-Net v2's "
            "imagesTr/<id>_0000.nii.gz + labelsTr/<id>.nii.gz (hard links, no extra space).",
        ),
    ] = Layout.default,
) -> None:
    """Sample N volumes with augmented anatomical conditions; resumable, shards by rank under torchrun."""
    from lad_fast.cli.options import resolve_run
    from lad_fast.generate.generate import generate as run_generate
    from lad_fast.runs.rundir import latest_run

    if run:
        run_path = resolve_run(run)
    else:
        run_path = latest_run()
        typer.echo(f"lad-fast: using run {run_path} (the latest complete run)", err=True)
    path = run_generate(
        run_path,
        out,
        n=n,
        sampler=sampler.value if sampler is not None else None,
        steps=steps,
        eta=eta,
        guidance=guidance,
        masks=masks,
        augment=augment,
        batch=batch,
        seed=seed,
        backend=backend.value,
        force=force,
        device=device,
        decode_tile=decode_tile,
        layout=layout.value,
    )
    typer.echo(f"generated {n} volume{'' if n == 1 else 's'} in {path}")
