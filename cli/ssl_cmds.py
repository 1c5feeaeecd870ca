"""``lad-fast ssl``: self-supervised pretraining on real + synthetic volumes, and few-label fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lad_fast.cli.options import (
    DeviceOpt,
    ForceOpt,
    Preset,
    PresetOpt,
    ResumeOpt,
    RunOpt,
    SeedOpt,
    StepsOpt,
    resolve_run,
)

ssl_app = typer.Typer(
    help="Did the synthetic data help? Pretrain the segmenter's U-Net self-supervised on real + generated "
    "volumes, then fine-tune it on a few labelled cases and score it per organ.",
    no_args_is_help=True,
)


@ssl_app.command("pretrain")
def pretrain(
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Prepared dataset: the real volumes. Default: built-in phantoms."),
    ] = None,
    synthetic: Annotated[
        list[Path] | None,
        typer.Option("--synthetic", help="A `lad-fast generate` output folder (repeatable)."),
    ] = None,
    synthetic_ratio: Annotated[
        float,
        typer.Option(
            "--synthetic-ratio",
            min=0.0,
            max=1.0,
            help="Expected fraction of each batch that is synthetic (when --synthetic is given).",
        ),
    ] = 0.5,  # fmt: skip
    cases: Annotated[
        str | None,
        typer.Option(
            "--cases",
            help="Comma-separated ids of the real cases to pretrain on. Default: all "
            "but the fine-tuning held-out cases.",
        ),
    ] = None,  # fmt: skip
    contrastive_weight: Annotated[
        float,
        typer.Option(
            "--contrastive-weight",
            help="Add Swin UNETR's contrastive term (NT-Xent between two views of each volume) at this "
            "weight; 0: off.",
        ),
    ] = 0.0,
    run: RunOpt = "ssl",
    preset: PresetOpt = Preset.tiny,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Masked-volume inpainting + rotation prediction (+ optional contrastive coding) on the segmenter's U-Net
    (into RUN/ssl/)."""
    from lad_fast.config import get_preset
    from lad_fast.ssl.settings import SSLConfig
    from lad_fast.train.ssl import pretrain as run_pretrain

    result = run_pretrain(
        resolve_run(run),
        get_preset(preset.value),
        data=data,
        synthetic=synthetic or [],
        ssl=SSLConfig(synthetic_ratio=synthetic_ratio, contrastive_weight=contrastive_weight),
        steps=steps,
        seed=seed,
        resume=resume,
        force=force,
        device=device,
        cases=_ids(cases),
    )
    typer.echo(f"ssl: {result.step} steps, checkpoint {result.checkpoint}")


@ssl_app.command("finetune")
def finetune(
    pretrained: Annotated[
        str, typer.Option("--pretrained", help="Run holding `ssl pretrain` weights, or 'none'.")
    ],
    labelled: Annotated[int, typer.Option("--labelled", "-k", help="K: labelled cases to fine-tune on.")],
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="Prepared dataset with masks. Default: built-in phantoms."),
    ] = None,
    cases: Annotated[
        str | None,
        typer.Option(
            "--cases",
            help="Comma-separated ids of the K cases to fine-tune on. Default: the "
            "first K labelled training cases.",
        ),
    ] = None,
    eval_every: Annotated[
        int,
        typer.Option(
            "--eval-every",
            help="Score the held-out cases every N steps (the learning curve, "
            "RUN/finetune/curve.jsonl); 0: only at the end.",
        ),
    ] = 0,
    pretrained_lr_scale: Annotated[
        float,
        typer.Option(
            "--pretrained-lr-scale",
            help="Learning rate of the pretrained weights relative to the rest (1: the same).",
        ),
    ] = 1.0,  # fmt: skip
    freeze_steps: Annotated[
        int,
        typer.Option(
            "--freeze-steps",
            help="Keep the pretrained weights frozen for the first N steps while the fresh layers "
            "learn, then fine-tune them too (0: never frozen).",
        ),
    ] = 0,
    transfer: Annotated[
        str,
        typer.Option(
            "--transfer",
            help="Pretrained weights to start from: 'all' (encoder and decoder) or 'encoder' (the "
            "decoder starts fresh).",
        ),
    ] = "all",
    run: RunOpt = "finetune",
    out: Annotated[Path | None, typer.Option("--out", help="Also write the Dice JSON here.")] = None,
    preset: PresetOpt = Preset.tiny,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Organ segmentation from K labelled cases; per-organ Dice on held-out cases (RUN/finetune/dice.json)."""
    import json

    from lad_fast.config import get_preset
    from lad_fast.train.ssl import finetune as run_finetune

    scores = run_finetune(
        resolve_run(run),
        get_preset(preset.value),
        pretrained=None if pretrained.lower() == "none" else resolve_run(pretrained),
        labels=labels,
        labelled=labelled,
        steps=steps,
        seed=seed,
        resume=resume,
        force=force,
        device=device,
        out=out,
        cases=_ids(cases),
        eval_every=eval_every,
        pretrained_lr_scale=pretrained_lr_scale,
        transfer=transfer,
        freeze_steps=freeze_steps,
    )
    typer.echo(json.dumps({"dice": scores.get("dice"), "cases": scores.get("cases")}))


def _ids(cases: str | None) -> list[str] | None:
    return None if cases is None else [c.strip() for c in cases.split(",") if c.strip()]
