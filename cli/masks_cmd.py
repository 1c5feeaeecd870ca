"""Mask commands: ``predict-masks`` (the built-in segmenter) and ``import-masks`` (an external one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lad_fast.cli.options import Vocabulary

DataArg = Annotated[Path, typer.Argument(help="Prepared dataset (lad-fast prepare).", file_okay=False)]


def predict_masks(
    data: DataArg,
    run: Annotated[
        str, typer.Option("--run", "-r", help="Run holding a trained segmenter (name or folder).")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Predict every case, replacing the masks it already has.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    allow_empty: Annotated[
        bool,
        typer.Option(
            help="Write a prediction that holds none of the organs the slice window is chosen by "
            "(pancreas) with a warning, instead of refusing it. A prediction without any organ is never "
            "written."
        ),
    ] = False,
) -> None:
    """Predict organ masks (and structure conditions) for the cases of DATA that have none.

    A case prepared without a mask is predicted over the whole height of its source image and its slice
    window chosen again from the prediction (its image is re-cropped): run this before training on DATA."""
    from lad_fast.cli.options import resolve_run
    from lad_fast.train.segmenter import predict_masks as predict

    written = predict(resolve_run(run), data, device=device, force=force, allow_empty=allow_empty)
    typer.echo(f"predicted masks for {len(written)} case(s) in {data}")


def import_masks(
    data: DataArg,
    masks: Annotated[
        Path, typer.Argument(help="Folder with <case id>/ TotalSegmentator folders or <case id>.nii.gz.")
    ],
    vocabulary: Annotated[
        Vocabulary, typer.Option(help="Label ids of the masks (organ folders are always TotalSegmentator).")
    ] = Vocabulary.totalseg,
    force: Annotated[
        bool, typer.Option("--force", help="Import for every case, replacing the masks it already has.")
    ] = False,
    allow_empty: Annotated[
        bool,
        typer.Option(
            help="Import a mask that holds none of the organs the slice window is chosen by (pancreas) "
            "with a warning, instead of refusing it."
        ),
    ] = False,
) -> None:
    """Import masks an external segmenter (TotalSegmentator) wrote, onto the cases of DATA.

    A case prepared without a mask gets its slice window chosen again from the mask (its source image
    is read again), so it ends up as if image and mask had been prepared together."""
    from lad_fast.data.masks import import_masks as run_import

    if vocabulary is Vocabulary.auto:
        raise typer.BadParameter("name the masks' vocabulary (totalseg, abdomenct1k, lad, canonical)")
    written = run_import(data, masks, vocabulary=vocabulary.value, force=force, allow_empty=allow_empty)
    n = len(written)
    typer.echo(f"imported masks for {n} case{'' if n == 1 else 's'} into {data}")
