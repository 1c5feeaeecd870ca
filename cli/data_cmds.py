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
    from lad_fast.data.phantom import write_phantoms

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
    force: ForceOpt = False,
) -> None:
    """Turn CT (NIfTI or DICOM) and masks into a prepared, preset-geometry training dataset."""
    from lad_fast.config import get_preset
    from lad_fast.data.prepared import prepare_dataset

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
    )
    typer.echo(f"prepared {len(index['cases'])} cases in {out}")


def preview(
    image: Annotated[Path, typer.Argument(help="NIfTI image, DICOM folder, or prepared case id path.")],
    mask: Annotated[Path | None, typer.Option("--mask", "-m", help="Label map to outline.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG path (default: beside the image).")
    ] = None,
) -> None:
    """Write a PNG of three orthogonal slices, with mask outlines."""
    from lad_fast.preview import write_preview

    path = write_preview(image, out=out, mask=mask)
    typer.echo(f"wrote {path}")
