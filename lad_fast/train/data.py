"""The data every trainer reads: the prepared dataset (the given one, or the built-in phantoms), and
batches from it as a pure function of (seed, step, rank), so a resumed run draws the same ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.config import LadConfig
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.utils.distributed import shard_indices


def training_dataset(data: PreparedDataset | str | Path | None, cfg: LadConfig) -> PreparedDataset:
    """The prepared dataset a training command reads, opened once and handed to every stage.

    data: an open :class:`PreparedDataset` (returned as it is, so masks a stage adds are seen by the next),
        a prepared folder, or None for the built-in phantoms of ``cfg.preset`` (generated and prepared
        once into the local cache, :func:`lad_fast.data.cache.phantom_dataset`). This is the one place
        that default is decided.
    Every case's arrays are verified against the index before training reads them
    (:meth:`PreparedDataset.verify`; a case already verified by this object is not read again).
    InputError for a dataset prepared at another preset than ``cfg.preset``, or a damaged case.
    """
    if isinstance(data, PreparedDataset):
        if data.preset != cfg.preset:
            raise InputError(
                f"{data.path}: prepared at preset {data.preset!r}, but {cfg.preset!r} is needed; re-prepare "
                f"it with `lad-fast prepare SRC OUT --preset {cfg.preset}`"
            )
        dataset = data
    else:
        if data is None:
            from lad_fast.data.cache import phantom_dataset
            from lad_fast.utils.progress import say

            say(f"data: built-in phantoms at preset {cfg.preset!r} (generated locally, cached)")
            data = phantom_dataset(cfg.preset)
        dataset = PreparedDataset(data, expect_preset=cfg.preset)
    dataset.verify()
    return dataset


def how_to_add_masks(data: str | Path) -> str:
    """The commands that give the cases of prepared dataset ``data`` masks (for error messages)."""
    return (
        f"give cases masks with `lad-fast import-masks {data} MASKS` (an external segmenter's output, such "
        f"as TotalSegmentator's), or with a segmenter trained on labelled data (`lad-fast train segmenter`): "
        f"`lad-fast predict-masks {data} --run RUN` or `lad-fast prepare SRC {data} --segmenter RUN`"
    )


def split_indices(n: int, val_fraction: float = 0.2, min_val: int = 1) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out split of ``n`` cases: the last ``max(min_val, n * f)`` are held out.

    Cases are in index order (sorted ids), so the split never depends on a seed or on the machine.
    With fewer than two cases there is nothing to hold out and both lists hold every case.
    """
    if n < 2:
        return list(range(n)), list(range(n))
    n_val = min(n - 1, max(min_val, round(n * val_fraction)))
    return list(range(n - n_val)), list(range(n - n_val, n))


@dataclass
class PreparedBatches:
    """``batches(step, rank, world) -> dict`` over a subset of a prepared dataset.

    Returns CPU tensors: ``image`` (B, 1, D, H, W) float32 in [-1, 1]; ``mask`` (B, D, H, W) int64 or
    None when a case has none (``require_mask`` makes that an error); ``structure`` (B, n) int64 or None;
    ``ids`` the case ids.
    """

    dataset: PreparedDataset
    batch_size: int
    seed: int
    indices: Sequence[int] | None = None
    require_mask: bool = False

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = list(range(len(self.dataset)))
        if not self.indices:
            raise InputError(f"{self.dataset.path}: no cases to train on")
        if self.require_mask:
            labelled = set(self.dataset.labelled_indices())
            missing = [self.dataset.case_ids[i] for i in self.indices if i not in labelled]
            if missing:
                raise InputError(
                    f"{self.dataset.path}: {len(missing)} case(s) have no mask ({', '.join(missing[:3])}); "
                    + how_to_add_masks(self.dataset.path)
                )

    def cases(self, idx: Sequence[int]) -> dict[str, Any]:
        items = [self.dataset[self.indices[i]] for i in idx]  # type: ignore[index]
        image = torch.from_numpy(np.stack([np.asarray(c["image"], dtype=np.float32) for c in items]))[:, None]
        has_mask = all(c["mask"] is not None for c in items)
        mask = torch.from_numpy(np.stack([np.asarray(c["mask"]) for c in items])).long() if has_mask else None
        structure = (
            torch.from_numpy(np.stack([np.asarray(c["structure"]) for c in items])) if has_mask else None
        )
        return {"image": image, "mask": mask, "structure": structure, "ids": [c["id"] for c in items]}

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        idx = shard_indices(len(self.indices), self.batch_size, self.seed, step, rank, world)  # type: ignore[arg-type]
        return self.cases(idx)

    def all(self) -> dict[str, Any]:
        """Every case of the subset in order (evaluation on held-out cases)."""
        return self.cases(range(len(self.indices)))  # type: ignore[arg-type]
