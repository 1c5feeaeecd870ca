"""Options shared by several commands, as ``Annotated`` aliases."""

from __future__ import annotations

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
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; one seed gives one result.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an output folder that holds other files.")]
OutDir = Annotated[Path, typer.Argument(help="Output folder.", file_okay=False)]
