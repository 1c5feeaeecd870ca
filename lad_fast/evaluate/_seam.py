"""The one place where evaluation reaches trained-run loading (segmenter, versions, checkpoint hashes).

DESIGN.md: evaluation never imports ``lad_fast.train``. Today these helpers still live there; they are
moving to a run-loading layer below it (``lad_fast.trained``). Every import of them in
``lad_fast.evaluate`` goes through this module, lazily, so that move changes only this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_segmenter(run: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained segmenter of ``run`` in eval mode and its checkpoint meta (plus ``"config"``)."""
    from lad_fast.train.segmenter import load_segmenter as load

    return load(Path(run), device)


def predict_volumes(net: torch.nn.Module, images: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Label maps of ``images`` (N, D, H, W) in [-1, 1] -> (N, D, H, W) uint8 canonical ids."""
    from lad_fast.train.segmenter import predict_volumes as predict

    return predict(net, images, device)


def segmenter_hash(run: Path) -> str:
    """Short hash of the run's latest segmenter checkpoint (its files' SHA-256, from ``meta.json``)."""
    from lad_fast.train.diffusion import checkpoint_hash

    return checkpoint_hash(Path(run) / "segmenter")


def has_segmenter(run: Path) -> bool:
    """Whether ``run`` holds a complete segmenter checkpoint (nothing is loaded)."""
    from lad_fast.train.checkpoint import latest_step_dir

    return (Path(run) / "segmenter").is_dir() and latest_step_dir(Path(run) / "segmenter") is not None


def versions() -> dict[str, str]:
    """Versions of lad-fast, torch and Python (as checkpoints record them)."""
    from lad_fast.train.checkpoint import versions as v

    return v()
