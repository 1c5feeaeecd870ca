"""Data commands: ``phantom``, ``prepare``, ``preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lad_fast.cli.options import ForceOpt, Layout, OutDir, Preset, PresetOpt, SeedOpt, Vocabulary


def phantom(
    out: OutDir,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Number of phantoms.")] = 8,
    preset: PresetOpt = Preset.tiny,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Write N synthetic abdominal CTs and TotalSegmentator-numbered label maps as NIfTI."""
    from lad_fast.config import get_preset
    from lad_fast.data.phantom.draw import write_phantoms

    cfg = get_preset(preset.value)
    paths = write_phantoms(out, n=n, cfg=cfg.phantom, seed=seed, force=force)
    typer.echo(f"wrote {len(paths)} phantoms to {out}")


def prepare(
    src: Annotated[Path, typer.Argument(help="Dataset folder, a CT file, or a DICOM series folder.")],
    out: OutDir,
    preset: PresetOpt = Preset.tiny,
    layout: Annotated[Layout, typer.Option(help="Dataset layout; auto detects it.")] = Layout.auto,
    vocabulary: Annotated[
        Vocabulary, typer.Option(help="Label ids of the masks; auto guesses from the layout.")
    ] = Vocabulary.auto,
    label_map: Annotated[
        Path | None, typer.Option(help='JSON map {"<id>": "<canonical organ>"} for the masks.')
    ] = None,
    strict: Annotated[bool, typer.Option(help="Label ids outside the vocabulary are an error.")] = False,
    segmenter: Annotated[
        str | None,
        typer.Option(help="Run with a trained segmenter: predicts masks for the cases that have none."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    skip_invalid: Annotated[
        bool,
        typer.Option(
            help="Leave out cases with bad scans (too small, broken, misaligned mask) instead of stopping; "
            "OUT/prepare_report.json names each one and why."
        ),
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Turn CT (NIfTI, DICOM or official Lad .npy crops) and masks into a prepared, preset-geometry
    training dataset."""
    from lad_fast.config import get_preset
    from lad_fast.data.prepare import prepare_dataset, read_report, skipped_summary

    cfg = get_preset(preset.value)
    index = prepare_dataset(
        src,
        out,
        cfg,
        layout=layout.value,
        vocabulary=vocabulary.value,
        label_map=label_map,
        strict=strict,
        force=force,
        skip_invalid=skip_invalid,
    )
    n = len(index["cases"])
    typer.echo(f"prepared {n} case{'' if n == 1 else 's'} in {out}")
    if skip_invalid and (summary := skipped_summary(read_report(out))):
        typer.echo(summary, err=True)
    unlabelled = [c["id"] for c in index["cases"] if not c["has_mask"]]
    if unlabelled and segmenter:
        from lad_fast.cli.options import resolve_run
        from lad_fast.train.segmenter import predict_masks

        written = predict_masks(resolve_run(segmenter), out, device=device)
        typer.echo(f"predicted masks and conditions for {len(written)} case(s) with segmenter {segmenter}")
    elif unlabelled:
        typer.echo(
            f"{len(unlabelled)} case(s) have no mask; give them predicted masks with "
            f"`lad-fast prepare ... --segmenter RUN`, `lad-fast predict-masks {out} --run RUN` "
            "(after `lad-fast train segmenter`), or `lad-fast import-masks`",
            err=True,
        )


def preview(
    sources: Annotated[
        list[Path],
        typer.Argument(
            help="NIfTI images or DICOM folders, a generated dataset folder, a prepared dataset, or a "
            "prepared case (PREPARED/cases/ID); several go into one grid."
        ),
    ],
    mask: Annotated[
        Path | None, typer.Option("--mask", "-m", help="Label map to outline (one image only).")
    ] = None,
    vocabulary: Annotated[
        Vocabulary,
        typer.Option(help="Label ids of --mask; auto reads labels.json or guesses from its name and ids."),
    ] = Vocabulary.auto,
    case: Annotated[
        list[str] | None, typer.Option("--case", help="Case id of a prepared dataset (repeatable).")
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", "-n", help="Volumes taken from a folder (default 4).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="PNG path (default: <name>.png or preview.png in this folder)."),
    ] = None,
) -> None:
    """Write one PNG comparing volumes: three orthogonal slices each, organ outlines named and coloured
    by organ."""
    from lad_fast.preview.render import write_preview

    vocab = None if vocabulary is Vocabulary.auto else vocabulary.value
    path = write_preview(sources, out=out, mask=mask, cases=case or (), n=n, vocabulary=vocab)
    typer.echo(f"wrote {path}")
