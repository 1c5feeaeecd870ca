"""``lad-fast evaluate``: realism, diversity and mask fidelity of a generated dataset against real volumes."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lad_fast.cli.options import ForceOpt


class Features(str, Enum):
    auto = "auto"
    segmenter = "segmenter"
    vqgan = "vqgan"
    medicalnet = "medicalnet"
    radimagenet_2p5d = "radimagenet-2.5d"


def _check_output(path: Path | None, force: bool) -> None:
    """Refuse an output the report could not be written to, before anything is computed: one that exists
    (without ``force``), a folder, one under a file, or one in a folder that cannot be written (read-only
    file system, no permission); the writability is probed by creating and removing a hidden file in the
    nearest folder that exists (the one the report's folders would be made in)."""
    import os
    import tempfile

    from lad_fast.errors import LadFastError, OutputExistsError

    if path is None:
        return
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists; choose another file or pass --force to overwrite it")
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; name a file")
    folder = path.absolute().parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputExistsError(f"{path}: {folder} is a file, not a folder; name a file in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lad-fast-write-check.", dir=folder)
    except OSError as err:
        raise LadFastError(
            f"{path}: cannot write in {folder} ({err.strerror or err}); choose a writable place for it"
        ) from err
    os.close(fd)
    os.unlink(probe)


RealOpt = Annotated[
    Path, typer.Option("--real", help="Real volumes: a prepared dataset or a folder of NIfTI volumes.")
]
SyntheticOpt = Annotated[
    Path, typer.Option("--synthetic", help="Generated folder (images/, masks/, manifest.jsonl).")
]
FeaturesOpt = Annotated[
    Features,
    typer.Option(
        help="FID/MMD features: the segmenter's encoder, the generator's VQ-GAN encoder, MedicalNet or "
        "RadImageNet 2.5D (with --weights). auto: the segmenter's, else the VQ-GAN's (mask metrics skipped)."
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="Weights file: MedicalNet resnet_<depth>.pth or RadImageNet ResNet-50.",
        dir_okay=False,
    ),
]
SegmenterOpt = Annotated[
    str | None,
    typer.Option(help="Run holding the segmenter (name or folder). Default: the run that generated it."),
]
SegmentationsOpt = Annotated[
    Path | None,
    typer.Option(
        "--segmentations",
        help="An external segmenter's masks of the synthetic volumes (e.g. TotalSegmentator), one per "
        "volume id: <id>.nii.gz or an organ folder <id>/, on the volume's grid (no resampling). Used "
        "for Dice, shuffled baseline, structure and volume error instead of the lad-fast segmenter, "
        "which then runs only for --features segmenter.",
        file_okay=False,
    ),
]
VocabularyOpt = Annotated[
    str,
    typer.Option(
        "--segmentation-vocabulary",
        help="Label ids of --segmentations files: totalseg, canonical, abdomenct1k, lad, or a JSON map "
        "file. auto: organ folders as totalseg, label files as canonical.",
    ),
]
RealSegmentationsOpt = Annotated[
    Path | None,
    typer.Option(
        "--real-segmentations",
        help="The same external segmenter's masks of the real volumes, one per real case id, on the grid "
        "of the image it ran on (a prepared case's source image, or images/<id> of a NIfTI folder): "
        "the real ceiling. Without it the ceiling is reported as skipped.",
        file_okay=False,
    ),
]
StrictOpt = Annotated[
    bool, typer.Option(help="Segmentation ids outside the vocabulary are an error (else a warning).")
]
FidelityOpt = Annotated[
    bool, typer.Option("--fidelity/--no-fidelity", help="Score masks (needs the synthetic masks/).")
]
JsonOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write every number as JSON here.")]
PngOpt = Annotated[Path | None, typer.Option("--png", help="Write the Dice / HU panel as PNG here.")]
BatchOpt = Annotated[int, typer.Option(help="Volumes per feature and segmenter batch.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


def evaluate(
    real: RealOpt,
    synthetic: SyntheticOpt,
    features: FeaturesOpt = Features.auto,
    weights: WeightsOpt = None,
    segmenter: SegmenterOpt = None,
    segmentations: SegmentationsOpt = None,
    segmentation_vocabulary: VocabularyOpt = "auto",
    real_segmentations: RealSegmentationsOpt = None,
    strict: StrictOpt = False,
    fidelity: FidelityOpt = True,
    out: JsonOutOpt = None,
    png: PngOpt = None,
    batch: BatchOpt = 4,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """FID, MMD, MS-SSIM diversity, per-organ Dice (with shuffled baseline and real ceiling), topology
    and HU statistics of SYNTHETIC against REAL, with real-vs-real and trivial-generator references."""
    from rich.console import Console

    from lad_fast.cli.options import resolve_run
    from lad_fast.errors import ConfigError
    from lad_fast.evaluate.render import render_panel, tables
    from lad_fast.evaluate.report import evaluate as run_evaluate
    from lad_fast.utils.atomic import atomic_path, write_json

    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    _check_output(out, force)
    _check_output(png, force)
    report = run_evaluate(
        real,
        synthetic,
        features=features.value,
        weights=weights,
        segmenter=resolve_run(segmenter) if segmenter else None,
        segmentations=segmentations,
        segmentation_vocabulary=segmentation_vocabulary,
        real_segmentations=real_segmentations,
        strict=strict,
        fidelity=fidelity,
        device=device,
        batch_size=batch,
    )
    report["command"] = " ".join(["lad-fast", *sys.argv[1:]]) if sys.argv[1:] else "lad-fast evaluate"
    console = Console()
    if not console.is_terminal:  # a pipe or file: rich would wrap the tables at 80 columns
        console = Console(width=120)
    for table in tables(report):
        if isinstance(table, str):  # a note: one line however wide, and no rich markup in its paths
            console.print(table, soft_wrap=True, markup=False, highlight=False)
        else:
            console.print(table)
    # Outputs are written only once every number exists, each atomically.
    if out is not None:
        write_json(out, report)
        typer.echo(f"wrote {out}")
    if png is not None:
        with atomic_path(png, suffix=".png") as tmp:
            render_panel(report).save(tmp, format="PNG")
        typer.echo(f"wrote {png}")
