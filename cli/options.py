"""Options shared by several commands, as ``Annotated`` aliases, and :func:`resolve_run`, how every
command reads a ``--run`` value."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Preset(str, Enum):
    tiny = "tiny"
    lad = "lad"
    lad_official = "lad-official"


class Layout(str, Enum):
    auto = "auto"
    abdomenct1k = "abdomenct1k"
    totalseg = "totalseg"
    nnunet = "nnunet"
    flat = "flat"
    file = "file"
    dicom = "dicom"


class Vocabulary(str, Enum):
    auto = "auto"
    totalseg = "totalseg"
    abdomenct1k = "abdomenct1k"
    lad = "lad"
    canonical = "canonical"


PresetOpt = Annotated[Preset, typer.Option("--preset", "-p", help="Geometry and model sizes.")]
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed and numpy's SeedSequence both take


def check_seed(value: int) -> int:
    """The ``--seed`` value, refused in one line (ConfigError, exit 2) outside 0..:data:`MAX_SEED`, while
    the options are parsed: before any command creates its output folder."""
    from lad_fast.errors import ConfigError

    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--seed {value}: give a whole number from 0 to {MAX_SEED}")
    return value


SeedOpt = Annotated[
    int,
    typer.Option("--seed", callback=check_seed, help="Random seed (0 or more); one seed gives one result."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an output folder that holds other files.")]
OutDir = Annotated[Path, typer.Argument(help="Output folder.", file_okay=False)]
RunOpt = Annotated[str, typer.Option("--run", "-r", help="Run name (under ./runs) or folder.")]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", min=1, help="Training steps (default: the preset's).")
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch", min=1, help="Volumes per training step (default: the preset's; see lad-fast plan)."
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


def resolve_run(run: str) -> Path:
    """A bare name means ./runs/<name>, unless only ./<name> is a run (a folder in the current one);
    anything with a path separator (``./mine``, ``runs/a``, an absolute path) is that folder."""
    p = Path(run)
    if p.is_absolute() or any(sep in run for sep in ("/", os.sep)) or run in (".", ".."):
        return p
    under = Path("runs") / run
    if not under.exists() and (p / "config.json").is_file():
        return p
    return under
