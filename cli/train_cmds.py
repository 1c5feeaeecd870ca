"""``lad-fast train``: the whole pipeline (no subcommand), or one model: vqgan, segmenter, diffusion."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lad_fast.cli.options import (
    BatchOpt,
    DeviceOpt,
    ForceOpt,
    Preset,
    PresetOpt,
    ResumeOpt,
    RunOpt,
    StepsOpt,
    resolve_run,
)

if TYPE_CHECKING:
    from lad_fast.config import LadConfig

train_app = typer.Typer(
    help="Train the models. Without a subcommand: the whole pipeline on the given data (default: phantoms).",
    invoke_without_command=True,
    no_args_is_help=False,
)

DataOpt = Annotated[
    Path | None,
    typer.Option("--data", "-d", help="Prepared dataset (lad-fast prepare). Default: built-in phantoms."),
]
HoldoutOpt = Annotated[
    float | None,
    typer.Option(
        "--holdout",
        help="VQ-GAN: fraction of cases held out for its reconstruction report (0: none). Default 0.2, "
        "or the resumed run's.",
    ),
]


def _check_memory(
    cfg: LadConfig, models: tuple[str, ...], device: str, steps: int | None, batch: int | None
) -> None:
    """On CUDA, before anything is read or written: each model's training step at the batch it will
    train with must fit the GPU (:func:`lad_fast.train.plan.check_device`: one line naming the largest
    batch that does). The whole pipeline checks the VQ-GAN and the diffusion model, which it always
    trains; a segmenter it trains for unlabelled cases is checked by ``train segmenter`` only."""
    from lad_fast.utils.devices import choose_device, resolve_device

    dev = resolve_device(choose_device(device))
    if dev.type != "cuda":
        return
    from lad_fast.train.plan import check_device

    for model in models:
        check_device(cfg, model, getattr(cfg, f"{model}_train").overridden(steps, batch), dev)


@train_app.callback()
def pipeline(
    ctx: typer.Context,
    data: DataOpt = None,
    run: RunOpt = "default",
    preset: PresetOpt = Preset.tiny,
    steps: StepsOpt = None,
    batch: BatchOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    holdout: HoldoutOpt = None,
) -> None:
    """Phantoms (when no --data), prepare, VQ-GAN, segmenter (when masks are missing), diffusion."""
    if ctx.invoked_subcommand is not None:
        return
    from lad_fast.config import get_preset
    from lad_fast.train.pipeline import train_pipeline

    _check_memory(get_preset(preset.value), ("vqgan", "diffusion"), device, steps, batch)

    path = train_pipeline(
        resolve_run(run),
        get_preset(preset.value),
        data=data,
        steps=steps,
        batch=batch,
        resume=resume,
        force=force,
        device=device,
        holdout=holdout,
    )
    typer.echo(f"trained run {path}")


@train_app.command("vqgan")
def vqgan(
    data: DataOpt = None,
    run: RunOpt = "default",
    preset: PresetOpt = Preset.tiny,
    steps: StepsOpt = None,
    batch: BatchOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    holdout: HoldoutOpt = None,
) -> None:
    """Phase 1: the 3D VQ-GAN with the locality loss."""
    from lad_fast.config import get_preset
    from lad_fast.train.vqgan import train_vqgan

    _check_memory(get_preset(preset.value), ("vqgan",), device, steps, batch)

    result = train_vqgan(
        resolve_run(run),
        get_preset(preset.value),
        data=data,
        steps=steps,
        batch=batch,
        resume=resume,
        force=force,
        device=device,
        holdout=holdout,
    )
    typer.echo(f"vqgan: {result.step} steps, checkpoint {result.checkpoint}")


@train_app.command("segmenter")
def segmenter(
    data: DataOpt = None,
    run: RunOpt = "default",
    preset: PresetOpt = Preset.tiny,
    steps: StepsOpt = None,
    batch: BatchOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """The built-in organ segmenter, on the labelled cases of a prepared dataset."""
    from lad_fast.config import get_preset
    from lad_fast.train.segmenter import train_segmenter

    _check_memory(get_preset(preset.value), ("segmenter",), device, steps, batch)

    result = train_segmenter(
        resolve_run(run),
        get_preset(preset.value),
        data=data,
        steps=steps,
        batch=batch,
        resume=resume,
        force=force,
        device=device,
    )
    typer.echo(f"segmenter: {result.step} steps, checkpoint {result.checkpoint}")


@train_app.command("diffusion")
def diffusion(
    data: DataOpt = None,
    run: RunOpt = "default",
    vqgan_run: Annotated[
        str | None, typer.Option("--vqgan", help="Run holding the trained VQ-GAN (default: --run).")
    ] = None,
    preset: PresetOpt = Preset.tiny,
    steps: StepsOpt = None,
    batch: BatchOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Phase 2: the conditional latent diffusion model with classifier-free guidance."""
    from lad_fast.config import get_preset
    from lad_fast.train.diffusion import train_diffusion

    _check_memory(get_preset(preset.value), ("diffusion",), device, steps, batch)

    result = train_diffusion(
        resolve_run(run),
        get_preset(preset.value),
        data=data,
        vqgan_run=resolve_run(vqgan_run) if vqgan_run else None,
        steps=steps,
        batch=batch,
        resume=resume,
        force=force,
        device=device,
    )
    typer.echo(f"diffusion: {result.step} steps, checkpoint {result.checkpoint}")
