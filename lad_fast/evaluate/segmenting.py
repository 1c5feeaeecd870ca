"""Which segmenter labels the volumes of an evaluation, and what the evaluation takes from the runs.

A generated folder's manifest names the run that made it (:func:`generator_run`). The segmenter comes from
``--segmenter RUN`` or, by default, that run (:func:`resolve_segmenter`); :func:`load_segmenting` loads it
with the HU window it was trained on and the condition config the generator was given, opening each run
once (the segmenter's run and the generator's are usually one folder). Without a lad-fast segmenter (an
external segmenter's files), :func:`run_settings` takes the window and conditions from the generator run.

Right after ``lad-fast train`` on labelled data the generator run holds no segmenter (the main job trains
one only to predict missing masks): :func:`find_segmenter` then answers None, the evaluation takes its
features from the run's VQ-GAN (:func:`load_generator_vqgan`) and reports the mask metrics as skipped with
:func:`no_segmenter_note`, which names the command that adds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lad_fast.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from lad_fast.config import ConditionConfig, LadConfig
    from lad_fast.runs.rundir import RunDir


def generator_run(records: dict[str, dict[str, Any]]) -> Path | None:
    """The one run the manifest ``records`` name as their maker; None when they name none or several."""
    runs = {r.get("run") for r in records.values() if r.get("run")}
    return Path(sorted(runs)[0]) if len(runs) == 1 else None


def resolve_segmenter(segmenter: Path | None, records: dict[str, dict[str, Any]], synthetic: Path) -> Path:
    """The run whose segmenter labels the volumes: ``segmenter``, else the run that generated them."""
    from lad_fast.runs.checkpoints import latest_step_dir

    if segmenter is not None:
        return Path(segmenter)
    run = generator_run(records)
    if run is None:
        raise InputError(
            f"{synthetic}: its manifest names no single run that made it; pass --segmenter RUN "
            "(a run trained with `lad-fast train segmenter --run RUN`)"
        )
    if latest_step_dir(run / "segmenter") is None:
        raise CheckpointError(
            f"the run that generated {synthetic} ({run}) holds no segmenter; train one with "
            f"`lad-fast train segmenter --run {run}` or pass --segmenter RUN"
        )
    return run


def find_segmenter(
    segmenter: Path | None, records: dict[str, dict[str, Any]], synthetic: Path
) -> Path | None:
    """:func:`resolve_segmenter`, but None instead of an error when no ``segmenter`` was named and the
    run that generated the volumes holds a VQ-GAN and no segmenter (the main job's run on labelled data)."""
    from lad_fast.runs.checkpoints import latest_step_dir

    run = generator_run(records)
    if (
        segmenter is None
        and run is not None
        and latest_step_dir(run / "segmenter") is None
        and latest_step_dir(run / "vqgan") is not None
    ):
        return None
    return resolve_segmenter(segmenter, records, synthetic)


def no_segmenter_note(run: Path) -> str:
    """The one line a report gives for mask metrics skipped because ``run`` holds no segmenter."""
    return (
        f"mask fidelity skipped: {run} holds no segmenter (the main job trains one only for unlabelled "
        f"cases); add Dice, shuffled baseline and real ceiling with `lad-fast train segmenter --run {run}` "
        "and evaluate again"
    )


def load_generator_vqgan(records: dict[str, dict[str, Any]], synthetic: Path, device: torch.device) -> Any:
    """The VQ-GAN of the run that generated the volumes, on ``device``, for ``vqgan`` features."""
    from lad_fast.runs.loading import load_vqgan

    run = generator_run(records)
    if run is None:
        raise InputError(
            f"{synthetic}: its manifest names no single run that made it, so there is no VQ-GAN for vqgan "
            "features; pass --segmenter RUN or --features medicalnet --weights FILE"
        )
    return load_vqgan(run, device)[0]


def _generator_config(gen_run: Path | None, opened: RunDir | None = None) -> LadConfig | None:
    """The config of the run that generated the volumes when it is at hand; ``opened``'s when that run
    is already open (it is not read again)."""
    from lad_fast.runs.rundir import RunDir

    if gen_run is None or not (gen_run / "config.json").is_file():
        return None
    if opened is not None and opened.path.resolve() == gen_run.resolve():
        return opened.config()
    return RunDir.open(gen_run).config()


@dataclass
class Segmenting:
    """The segmenter that labels volumes, and the settings the evaluation takes from the runs.

    window: the HU window the segmenter was trained on (both sides go through it); cond: the condition
    config of the run that generated the volumes (else the segmenter run's), for structure vectors;
    checkpoint_hash: the hash of the segmenter checkpoint loaded (the report records it).
    """

    run: Path
    net: torch.nn.Module
    device: torch.device
    window: tuple[float, float]
    cond: ConditionConfig
    generator_run: Path | None
    checkpoint_hash: str


def load_segmenting(
    segmenter: Path | None, records: dict[str, dict[str, Any]], synthetic: Path, device: str
) -> Segmenting:
    """The segmenter of :func:`resolve_segmenter` on ``device``, with its window and the conditions."""
    from lad_fast.runs.loading import load_segmenter
    from lad_fast.runs.rundir import RunDir
    from lad_fast.utils.devices import resolve_device

    seg_run = resolve_segmenter(segmenter, records, synthetic)
    dev = resolve_device(device)
    seg_dir = RunDir.open(seg_run)
    net, meta = load_segmenter(seg_dir, dev)
    seg_cfg = seg_dir.config()
    gen_run = generator_run(records)
    gen_cfg = _generator_config(gen_run, seg_dir)
    cond = gen_cfg.condition if gen_cfg is not None else seg_cfg.condition  # what the generator was given
    window = (float(seg_cfg.geometry.hu_window[0]), float(seg_cfg.geometry.hu_window[1]))
    return Segmenting(seg_run, net, dev, window, cond, gen_run, meta["checkpoint_hash"])


def run_settings(records: dict[str, dict[str, Any]]) -> tuple[tuple[float, float], Any, Path | None]:
    """(HU window, condition config, generator run) without a segmenter: the run that generated the
    volumes when its config is at hand, else the defaults every preset shares (window -1000..400 HU,
    Lad's structure organs)."""
    from lad_fast.config import ConditionConfig, GeometryConfig

    gen_run = generator_run(records)
    cfg = _generator_config(gen_run)
    if cfg is not None:
        window = (float(cfg.geometry.hu_window[0]), float(cfg.geometry.hu_window[1]))
        return window, cfg.condition, gen_run
    window = GeometryConfig().hu_window
    return (float(window[0]), float(window[1])), ConditionConfig(), gen_run


def segmenter_record(seg: Segmenting | None) -> dict[str, Any] | None:
    """The report's ``segmenter`` entry: the run and checkpoint hash of the segmenter used, or None."""
    if seg is None:
        return None
    return {"run": str(seg.run), "checkpoint_hash": seg.checkpoint_hash}
