"""Segmentations an external segmenter (TotalSegmentator, ...) wrote, used for mask fidelity in place of
lad-fast's own segmenter (issue 10, item 1).

A folder holds one entry per volume id, found as ``lad-fast import-masks`` finds them
(:func:`lad_fast.data.masks.find_external`) and read by the same reader
(:func:`lad_fast.data.io.read_labels`):
``<id>.nii.gz`` (or ``.nii``), a label map, or ``<id>/``, a TotalSegmentator organ folder of
``<organ>.nii.gz`` masks.

Vocabulary: an organ folder always yields TotalSegmentator v2 ids; a label file is read in the vocabulary
given (``totalseg``, ``canonical``, ``abdomenct1k``, ``lad`` or a JSON map file), ``canonical`` by default.
Ids outside the vocabulary become background with a warning, or an error with ``strict``, as in
``lad-fast prepare --strict`` (:func:`lad_fast.data.labels.to_canonical`).

Grid: a synthetic volume's segmentation must lie on that volume's voxel grid (same shape, affines within
:data:`lad_fast.data.masks.GRID_TOLERANCE_MM`), in any voxel order (both are reoriented to canonical first).
Nothing is resampled: TotalSegmentator writes its output on its input's grid, so another grid means it ran
on another file, and guessing an alignment would score the wrong voxels. Real segmentations lie on the
grid of the real volume as the user has it (a prepared case's source image, as for ``import-masks``, or
``images/<id>.nii.gz`` of a NIfTI folder) and follow the real image onto the evaluation grid through the
same resampling and crop (:func:`lad_fast.data.masks.mask_onto_case`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lad_fast.errors import ConfigError, InputError

SEGMENTATION_VOCABULARIES = ("totalseg", "canonical", "abdomenct1k", "lad")
FOLDER_VOCABULARY = "totalseg"  # what lad_fast.data.io reads an organ folder as
FILE_VOCABULARY = "canonical"  # default for label files


@dataclass(frozen=True)
class ExternalSegmentations:
    """A folder of external segmentations and how to read its labels.

    vocabulary: a name of :data:`SEGMENTATION_VOCABULARIES`, a ``{id: organ}`` map, or None (organ folders
    as TotalSegmentator, label files as canonical); name: how the report records it.
    """

    folder: Path
    vocabulary: str | dict[int, str] | None
    name: str
    strict: bool = False

    @classmethod
    def open(
        cls, folder: Path | str, vocabulary: str | Path | None = None, strict: bool = False
    ) -> ExternalSegmentations:
        """Check the folder exists and the vocabulary is known (a name, or a ``.json`` map file)."""
        from lad_fast.data.labels import load_user_map

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(
                f"{folder}: no such folder; pass the folder holding one segmentation per volume id "
                "(<id>.nii.gz or a TotalSegmentator folder <id>/)"
            )
        if vocabulary is None or str(vocabulary) == "auto":
            return cls(folder, None, "auto", strict)
        if str(vocabulary).endswith(".json"):
            return cls(folder, load_user_map(vocabulary), str(vocabulary), strict)
        if vocabulary not in SEGMENTATION_VOCABULARIES:
            raise ConfigError(
                f"unknown segmentation vocabulary {str(vocabulary)!r}; choose one of "
                f'{", ".join(SEGMENTATION_VOCABULARIES)} or pass a JSON map file {{"<id>": "<organ>"}}'
            )
        return cls(folder, str(vocabulary), str(vocabulary), strict)

    @classmethod
    def open_optional(
        cls, folder: Path | str | None, vocabulary: str | Path | None = None, strict: bool = False
    ) -> ExternalSegmentations | None:
        """:meth:`open`, or None without a folder."""
        return None if folder is None else cls.open(folder, vocabulary, strict)

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.folder), "vocabulary": self.name, "strict": self.strict}

    def paths(self, ids: list[str], side: str) -> list[Path]:
        """The entry of each id; InputError naming the first id without one."""
        from lad_fast.data.masks import find_external

        found = [find_external(self.folder, i) for i in ids]
        missing = [i for i, p in zip(ids, found, strict=True) if p is None]
        if missing:
            raise InputError(
                f"{self.folder}: no segmentation for {len(missing)} of {len(ids)} {side} volumes (first: "
                f"{missing[0]}); expected {missing[0]}.nii.gz or a TotalSegmentator folder {missing[0]}/ "
                "for every volume"
            )
        return [p for p in found if p is not None]

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One entry as canonical ids in file voxel order (I, J, K) uint8 and its (4, 4) affine."""
        from lad_fast.data.io import read_labels
        from lad_fast.data.labels import to_canonical

        vocabulary: str | dict[int, str]
        if path.is_dir():
            if self.vocabulary not in (None, FOLDER_VOCABULARY):
                raise InputError(
                    f"{path}: a TotalSegmentator organ folder holds TotalSegmentator masks, but the "
                    f"segmentation vocabulary is {self.name}; it applies to label files only: leave it "
                    "at auto or totalseg"
                )
            vocabulary = FOLDER_VOCABULARY
        else:
            vocabulary = FILE_VOCABULARY if self.vocabulary is None else self.vocabulary
        labels = read_labels(path)  # rejects non-integer and negative labels, naming the file
        canonical, _ = to_canonical(
            labels.array, vocabulary, affine=labels.affine, strict=self.strict, source=str(path)
        )
        return canonical, labels.affine


def on_grid(
    canonical: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], grid_affine: np.ndarray, source: str,
    volume: str,
) -> np.ndarray:  # fmt: skip
    """Canonical ids in file order -> (D, H, W) uint8 on the volume grid (``shape``, ``grid_affine``, both
    canonical (D, H, W)); InputError unless the segmentation lies on that grid."""
    from lad_fast.data.geometry import canonical_dhw
    from lad_fast.data.masks import GRID_TOLERANCE_MM
    from lad_fast.data.volume import Volume

    ids, aff = canonical_dhw(Volume(np.asarray(canonical, dtype=np.uint8), affine, source))
    if tuple(ids.shape) != tuple(shape):
        raise InputError(
            f"{source}: segmentation has shape {tuple(ids.shape)} (D, H, W), its volume {volume} "
            f"{tuple(shape)}; run the segmenter on the volume file itself (no resampling is done)"
        )
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    shift = float(np.abs((np.asarray(grid_affine) - aff) @ corners)[:3].max())
    if shift > GRID_TOLERANCE_MM:
        raise InputError(
            f"{source}: segmentation grid is up to {shift:.3g} mm away from its volume {volume}'s; run the "
            "segmenter on the volume file itself (no resampling is done)"
        )
    return ids


def read_synthetic_segmentations(
    ext: ExternalSegmentations, ids: list[str], affines: list[np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    """The segmentations of the synthetic volumes ``ids`` (canonical affines ``affines``, grid ``shape``
    (D, H, W)) -> (N, D, H, W) uint8 canonical ids."""
    from lad_fast.utils.progress import track

    out = []
    for vid, path, aff in track(
        list(zip(ids, ext.paths(ids, "synthetic"), affines, strict=True)), "read segmentations"
    ):
        canonical, seg_affine = ext.read(path)
        out.append(on_grid(canonical, seg_affine, shape, aff, str(path), f"images/{vid}"))
    return np.stack(out)
