"""Procedural abdominal CT phantoms: lad-fast's embedded default data, generated locally from a seed.

:func:`generate_phantom` evaluates analytic anatomy (``phantom_anatomy``) directly on the target grid,
then adds partial-volume blur and slightly correlated CT noise. :func:`write_phantoms` writes a flat
dataset (``images/``, ``masks/``, ``labels.json``) that ``lad-fast prepare`` reads like real CT.
Labels use TotalSegmentator v2 ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from lad_fast.config import PhantomConfig
from lad_fast.data.phantom.anatomy import AIR, GAS, TISSUE_HU, draw_abdomen
from lad_fast.data.phantom.shapes import Canvas, smooth_field
from lad_fast.errors import ConfigError, OutputExistsError

LABELS_JSON = {"vocabulary": "totalseg"}


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """(4, 4) affine of the canonical ``(d, h, w)`` grid: index -> RAS mm, field of view centred on 0.

    Column 0 (d) moves along z, column 1 (h) along y, column 2 (w) along x.
    """
    D, H, W = shape
    sd, sh, sw = spacing
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = sd, sh, sw
    affine[:3, 3] = (-(W - 1) / 2 * sw, -(H - 1) / 2 * sh, -(D - 1) / 2 * sd)
    affine[3, 3] = 1.0
    return affine


def _check(cfg: PhantomConfig) -> None:
    if len(cfg.shape) != 3 or min(cfg.shape) < 4:
        raise ConfigError(f"phantom shape {cfg.shape} must be three sizes of at least 4 voxels")
    if len(cfg.spacing) != 3 or min(cfg.spacing) <= 0:
        raise ConfigError(f"phantom spacing {cfg.spacing} must be three positive sizes in mm")
    if cfg.noise_hu < 0 or cfg.blur_mm < 0:
        raise ConfigError(f"phantom noise_hu ({cfg.noise_hu}) and blur_mm ({cfg.blur_mm}) must be >= 0")


def generate_phantom(seed: int, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdomen at the level of the pancreas.

    Returns ``hu`` float32 ``(D, H, W)``, ``labels`` uint8 ``(D, H, W)`` in TotalSegmentator v2 ids and
    the (4, 4) affine of the ``(d, h, w)`` grid (RAS mm). D, H, W increase toward superior, anterior
    and the patient's right. The same seed and config give the same arrays.
    """
    _check(cfg)
    D, H, W = cfg.shape
    sd, sh, sw = cfg.spacing
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1AD]))
    affine = phantom_affine(cfg.shape, cfg.spacing)
    x = affine[0, 3] + np.arange(W) * sw
    y = affine[1, 3] + np.arange(H) * sh
    z = affine[2, 3] + np.arange(D) * sd
    # A low-frequency displacement of the whole anatomy, then organ-surface bump fields.
    warp = (
        smooth_field(rng, x, y, z, 180.0) * np.float32(rng.uniform(3, 8)),
        smooth_field(rng, x, y, z, 180.0) * np.float32(rng.uniform(3, 8)),
    )
    cv = Canvas(x, y, z, warp)
    fields = [smooth_field(rng, x, y, z, 70.0, terms=4) for _ in range(6)]
    draw_abdomen(cv, rng, fields)

    # Each case's tissues differ by a few HU (scanner calibration, perfusion); air and gas stay -1000.
    jitter = rng.normal(0, 4, size=TISSUE_HU.shape).astype(np.float32)
    jitter[[AIR, GAS]] = 0
    hu = (TISSUE_HU + jitter)[cv.tissue]
    if cfg.blur_mm > 0:  # partial volume: a Gaussian point spread of sigma blur_mm, in voxels per axis
        sigma = [cfg.blur_mm / sp for sp in cfg.spacing]
        hu = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    if cfg.noise_hu > 0:
        # CT noise is correlated over about a voxel in-plane: filter white noise, then restore its std.
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, (0.3, 0.7, 0.7))
        noise *= np.float32(cfg.noise_hu / max(float(noise.std()), 1e-6))
        hu += noise * (cv.tissue != 0)  # no noise in the air outside: keeps the outline clean
    return hu.astype(np.float32), cv.labels, affine


def case_seed(seed: int, k: int) -> int:
    """Seed of case ``k`` of a run with ``seed``: independent of how many cases the run writes."""
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def case_name(seed: int, k: int) -> str:
    return f"phantom_{seed}_{k:04d}"


def _ours(rel: Path) -> bool:
    parts = rel.parts
    if parts == ("labels.json",) or parts in (("images",), ("masks",)):
        return True
    return (
        len(parts) == 2 and parts[0] in ("images", "masks") and parts[1].startswith(("phantom_", ".phantom_"))
    )


def write_phantoms(out: Path, n: int, cfg: PhantomConfig, seed: int, force: bool = False) -> list[Path]:
    """Write ``n`` phantoms as ``out/images/<name>.nii.gz`` (int16 HU) and ``out/masks/<name>.nii.gz``.

    ``<name>`` is ``phantom_<seed>_<k:04d>``; ``out/labels.json`` names the TotalSegmentator vocabulary.
    A rerun skips cases whose image and mask both exist; ``force`` regenerates them and allows an
    ``out`` holding files lad-fast did not write (otherwise :class:`OutputExistsError`). Returns the
    image paths in case order.
    """
    from lad_fast.data.geometry import dhw_to_nifti
    from lad_fast.data.io import write_nifti
    from lad_fast.utils.atomic import write_json
    from lad_fast.utils.progress import track

    out = Path(out)
    if n < 1:
        raise ConfigError(f"phantom count n={n} must be at least 1")
    if seed < 0:  # numpy's generators take no negative seed; refused before the folder is created
        raise ConfigError(f"phantom seed {seed} must be 0 or more")
    _check(cfg)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder; choose another output folder")
    if out.is_dir() and not force:
        foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not _ours(p.relative_to(out)))
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise OutputExistsError(
                f"{out} holds files lad-fast did not write ({shown}); choose an empty folder or pass --force"
            )
    write_json(out / "labels.json", LABELS_JSON)
    paths = []
    for k in track(range(n), "phantoms"):
        name = case_name(seed, k)
        image, mask = out / "images" / f"{name}.nii.gz", out / "masks" / f"{name}.nii.gz"
        paths.append(image)
        if image.exists() and mask.exists() and not force:
            continue
        hu, labels, affine = generate_phantom(case_seed(seed, k), cfg)
        labels_ijk, affine_ijk = dhw_to_nifti(labels, affine)
        hu_ijk, _ = dhw_to_nifti(hu, affine)
        # Mask first, image last: both are atomic, and the rerun check needs both files anyway.
        write_nifti(mask, labels_ijk, affine_ijk, kind="labels")
        write_nifti(image, hu_ijk, affine_ijk, kind="image")
    return paths
