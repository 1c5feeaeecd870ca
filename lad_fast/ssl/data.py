"""The pretraining pool: real prepared cases mixed with generated volumes at a stated ratio.

Generated folders are read in their own format (``images/<id>.nii.gz`` listed by ``manifest.jsonl``,
:mod:`lad_fast.generate.writer`), checked against the preset's grid before training, and kept in memory as
float16 in [-1, 1] once read (a tiny volume is 128 KiB; at ``lad`` a thousand volumes take 4 GiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.config import GeometryConfig
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.ssl.objectives import block_mask, mask_volumes, random_rotations
from lad_fast.ssl.settings import SSLConfig


def _read_volume(path: Path, geometry: GeometryConfig, folder: Path) -> np.ndarray:
    """One generated image as (D, H, W) float16 in [-1, 1]; InputError when it is not on the preset grid."""
    from lad_fast.data.geometry import canonical_dhw, hu_to_unit
    from lad_fast.data.io import read_image

    hu, affine = canonical_dhw(read_image(path))
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    want_shape, want_spacing = tuple(geometry.shape), np.asarray(geometry.spacing, dtype=float)
    if tuple(hu.shape) != want_shape or not np.allclose(spacing, want_spacing, atol=1e-3):
        got = tuple(round(float(s), 3) for s in spacing)
        raise InputError(
            f"{folder}: generated at another preset or geometry ({path.name}: shape {tuple(hu.shape)} at "
            f"{got} mm, this preset needs {want_shape} at {tuple(geometry.spacing)} mm); generate it with "
            "a run of the same --preset"
        )
    return hu_to_unit(hu, geometry.hu_window).astype(np.float16)


@dataclass
class GeneratedVolumes:
    """The images of one or more ``lad-fast generate`` folders, on ``geometry``'s grid.

    ``len(pool)`` volumes; ``pool[i]`` (D, H, W) float16 in [-1, 1]. Construction lists every folder and
    reads the first volume of each, so a folder of another preset fails before any training.
    """

    folders: Sequence[Path]
    geometry: GeometryConfig
    paths: list[tuple[Path, Path]] = field(default_factory=list, init=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from lad_fast.generate.writer import MANIFEST, read_manifest, volume_paths

        for folder in map(Path, self.folders):
            if not (folder / MANIFEST).is_file():
                raise InputError(
                    f"{folder}: no {MANIFEST}; pass the output folder of `lad-fast generate` as --synthetic"
                )
            records = [r for _, r in sorted(read_manifest(folder).items())]
            images = [(folder, volume_paths(folder, r.get("id"))[0]) for r in records]
            images = [(f, p) for f, p in images if p.is_file()]
            if not images:
                raise InputError(f"{folder}: the manifest lists no complete volume; generate some first")
            self.paths += images
            self[len(self.paths) - len(images)]  # check the folder's grid now

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._cache:
            folder, path = self.paths[i]
            self._cache[i] = _read_volume(path, self.geometry, folder)
        return self._cache[i]


@dataclass
class SSLBatches:
    """``batches(step, rank, world) -> dict`` for pretraining; a pure function of (seed, step, rank).

    Each of the ``batch_size`` volumes is generated with probability ``cfg.synthetic_ratio`` (when there
    are generated volumes), else real, drawn uniformly from its pool; then turned by a random quarter turn
    and block-masked. Returns ``input`` (B, 1, D, H, W) masked and turned, ``target`` the turned volume,
    ``mask`` (B, 1, D, H, W) bool, ``rotation`` (B,) int64, ``synthetic`` (B,) bool; with a contrastive
    term (``cfg.contrastive_weight`` > 0) also ``view``: the same volumes turned and masked anew.
    """

    real: PreparedDataset
    real_indices: Sequence[int]
    synthetic: GeneratedVolumes | None
    batch_size: int
    seed: int
    cfg: SSLConfig

    def __post_init__(self) -> None:
        if not self.real_indices:
            raise InputError(f"{self.real.path}: no real case to pretrain on")

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        from lad_fast.utils.distributed import step_generator

        g = step_generator(self.seed, step, rank)
        n_syn = len(self.synthetic) if self.synthetic is not None else 0
        vols, flags = [], []
        for _ in range(self.batch_size):
            use_syn = n_syn > 0 and bool(torch.rand((), generator=g) < self.cfg.synthetic_ratio)
            if use_syn:
                vol = self.synthetic[int(torch.randint(0, n_syn, (), generator=g))]  # type: ignore[index]
            else:
                case = self.real_indices[int(torch.randint(0, len(self.real_indices), (), generator=g))]
                vol = self.real[case]["image"]
            vols.append(np.asarray(vol, dtype=np.float32))
            flags.append(use_syn)
        x = torch.from_numpy(np.stack(vols))[:, None]
        target, labels = random_rotations(x, g)
        mask = block_mask(tuple(target.shape), self.cfg.mask_grid, self.cfg.mask_ratio, g)
        batch = {
            "input": mask_volumes(target, mask, self.cfg.noise_std, g),
            "target": target,
            "mask": mask,
            "rotation": labels,
            "synthetic": torch.tensor(flags),
        }
        if self.cfg.contrastive_weight > 0:  # drawn after the first view, which stays as it was
            turned, _ = random_rotations(x, g)
            mask2 = block_mask(tuple(turned.shape), self.cfg.mask_grid, self.cfg.mask_ratio, g)
            batch["view"] = mask_volumes(turned, mask2, self.cfg.noise_std, g)
        return batch
