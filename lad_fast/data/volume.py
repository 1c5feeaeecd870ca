"""The in-memory volume every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Volume:
    """A 3D array in its file's voxel order ``(i, j, k)`` and the affine mapping voxels to RAS mm.

    Readers return this untouched by geometry: ``lad_fast.data.geometry`` reorients to canonical RAS,
    transposes to ``(D, H, W)`` = (superior, anterior, right) axes, resamples and crops.
    """

    array: np.ndarray  # (I, J, K), float32 HU for images, integer ids for label maps
    affine: np.ndarray  # (4, 4) float64, voxel index -> RAS world mm
    source: str  # file or folder it was read from (for error messages and index.json)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        s = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)
