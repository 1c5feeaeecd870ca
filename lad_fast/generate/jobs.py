"""What volume ``i`` of a generated dataset is: its seeds, source mask, augmentation and conditions.

Volume ``i`` of ``n`` takes source mask ``i % S`` of the S source masks and variant ``(i // S) % augment``
of its augmentations (``lad_fast.conditioning.augment``: result k of
``augment_many(mask, ..., augment_seed(seed, s), K)``); its conditions are recomputed from that augmented
mask; its sampling noise comes from ``torch.Generator().manual_seed(volume_seed(seed, i))``. Everything
here is a function of (seed, i) and the source masks only, never of the batch, the rank or the process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.errors import InputError


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on ``parts`` only (not on process, batch, rank or Python's hash seed).

    Exactly: ``":".join(str(p) for p in parts)`` encoded as UTF-8 (``("volume", 0, 3)`` -> ``"volume:0:3"``),
    hashed with BLAKE2b at ``digest_size=8``, the 8 digest bytes read as a little-endian unsigned integer,
    and the top bit cleared (``& (2**63 - 1)``) so the value fits ``torch.Generator.manual_seed``'s int64.
    Generated datasets depend on these values: tests pin a few of them.
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def volume_seed(seed: int, i: int) -> int:
    """Seed of volume ``i``'s sampling noise: ``derive_seed("volume", seed, i)``."""
    return derive_seed("volume", seed, i)


def augment_seed(seed: int, source: int) -> int:
    """Seed of source mask ``source``'s augmentations: ``derive_seed("augment", seed, source)``'s low 32
    bits (variant k of that source draws from ``numpy.random.default_rng([augment_seed, k])``)."""
    return derive_seed("augment", seed, source) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------- source masks


@dataclass(frozen=True)
class SourceMask:
    """One source mask on the preset grid: (D, H, W) canonical ids and the grid's (4, 4) affine."""

    case: str
    mask: np.ndarray
    affine: np.ndarray


def load_source_masks(path: Path, preset: str, shape: tuple[int, int, int]) -> list[SourceMask]:
    """Masks of a prepared dataset (cases with a mask), or of a folder of NIfTI label maps with canonical
    ids already on the preset grid (the ``masks/`` folder of a generated dataset, for instance). The cases
    of a prepared dataset are verified against its index first (:meth:`PreparedDataset.verify`): a damaged
    mask is refused naming the case, never conditioned on."""
    from lad_fast.data.prepared import INDEX, PreparedDataset

    path = Path(path)
    if (path / INDEX).is_file():
        ds = PreparedDataset(path, expect_preset=preset)
        masked = [i for i, case in enumerate(ds.case_ids) if ds.entry(case)["has_mask"]]
        ds.verify(masked)
        out = []
        for i in masked:
            item = ds[i]
            out.append(SourceMask(ds.case_ids[i], np.asarray(item["mask"]), item["affine"]))
        if not out:
            raise InputError(f"{path}: no case has a mask; generation is conditioned on masks")
        return out
    if not path.is_dir():
        raise InputError(f"{path}: no such folder; pass a prepared dataset or a folder of NIfTI masks")
    import nibabel as nib

    from lad_fast.data.checks import check_nifti_size
    from lad_fast.data.geometry import nifti_to_dhw
    from lad_fast.data.io import is_nifti, nifti_stem

    files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        raise InputError(f"{path}: neither a prepared dataset (no {INDEX}) nor a folder of NIfTI masks")
    out = []
    for f in files:
        img = nib.load(str(f))
        check_nifti_size(f, img)  # a header claiming more voxels than the file holds: refused unread
        mask, affine = nifti_to_dhw(np.asarray(img.dataobj), img.affine)
        if mask.shape != tuple(shape) or mask.dtype.kind not in "iu":
            raise InputError(
                f"{f}: a {mask.dtype} mask of shape {mask.shape} is not on the {preset!r} grid "
                f"{tuple(shape)}; prepare it with `lad-fast prepare` and pass the prepared folder"
            )
        out.append(SourceMask(nifti_stem(f), mask, affine))
    return out


def augmented_mask(
    src: SourceMask, index: int, variant: int | None, seed: int, cfg: Any
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Variant ``variant`` of source ``index`` (None: the source mask itself) and its record.

    Equal to result ``variant`` of ``augment_many(src.mask, spacing, cfg.augment, seed_s, K)`` for any K
    with ``seed_s = augment_seed(seed, index)`` (that function seeds result k with
    ``default_rng([seed_s, k])``); only the asked-for one is computed.
    """
    from lad_fast.conditioning.augment import augment_mask

    if variant is None:
        return src.mask, None
    seed_s = augment_seed(seed, index)
    mask, record = augment_mask(
        src.mask, cfg.geometry.spacing, cfg.augment, np.random.default_rng([seed_s, variant])
    )
    return mask, {"seed": seed_s, "index": variant, **record}


@dataclass(frozen=True)
class Job:
    """Volume ``index``: its source mask, the augmented mask (D, H, W) that conditions it (and is written
    beside it), the augmentation record (None: no augmentation), and the conditions ``content``
    (C, d, h, w), ``structure`` (L,) and ``spatial`` (NUM_CLASSES, d, h, w; None unless the model uses
    spatial conditioning) computed from that mask."""

    index: int
    source: SourceMask
    mask: np.ndarray
    augmentation: dict[str, Any] | None
    content: torch.Tensor
    structure: torch.Tensor
    spatial: torch.Tensor | None = None


def draw_job(
    i: int,
    sources: Sequence[SourceMask],
    seed: int,
    augment: int,
    cfg: Any,
    encode: Callable[[np.ndarray], dict[str, torch.Tensor]],
) -> Job:
    """Volume ``i``: source ``i % S``, variant ``(i // S) % augment`` (none when ``augment`` is 0), its
    augmented mask and that mask's conditions from ``encode`` (``Generator.encode``); ``cfg`` is the
    run's config (geometry spacing and augmentation settings)."""
    s = i % len(sources)
    variant = (i // len(sources)) % augment if augment else None
    mask, record = augmented_mask(sources[s], s, variant, seed, cfg)
    cond = encode(mask)
    return Job(i, sources[s], mask, record, cond["content"], cond["structure"], cond.get("spatial"))
