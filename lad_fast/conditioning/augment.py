"""Condition augmentation (Lad phase 3: docs/lad.md, "Phase 3"): many plausible masks from one mask.

One draw, in this order:

1. a small random affine about the volume centre, in mm: rotation about the axial (D) axis up to
   ``rotate_deg``, tilts about the two in-plane axes up to a quarter of that, isotropic scale in
   ``scale``, translation up to ``translate_mm`` per axis. Rotations and a positive scale keep the
   determinant positive, so there is never a left-right flip (anatomy has a side: W grows toward the
   patient's right);
2. a smooth elastic displacement: control points on an ``elastic_grid``^3 lattice, each component
   uniform in [-elastic_mm, elastic_mm], upsampled trilinearly to every voxel;
3. nearest-neighbour resampling of the labels (values are copied, never blended; outside is background);
4. organ volumes are checked against ``volume_range`` (ratio to the source, organs of at least
   ``MIN_CHECKED_VOXELS``); a draw that leaves the range is rejected and redrawn, up to ``MAX_DRAWS``
   times, then :class:`ConfigError` says which organ could not be kept;
5. per organ, with ``morph_prob``, a one-voxel dilation (into background only) or erosion; the step is
   skipped when it would leave ``volume_range``;
6. per organ, with ``remove_prob``, removal.

Voxels an organ loses (erosion, removal) go to its parent organ when it has one (a pancreatic lesion
sits inside the pancreas), else to background. ``augment_many`` derives one generator per index from
(seed, index), so result k never depends on how many were asked for.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from lad_fast.config import AugmentConfig
from lad_fast.errors import ConfigError, InputError
from lad_fast.organs import CANONICAL_ID, CANONICAL_ORGANS

MAX_DRAWS = 10
MIN_CHECKED_VOXELS = 64  # smaller organs change volume at the voxel-noise level under any resampling
PARENT: dict[int, int] = {CANONICAL_ID["pancreatic_lesion"]: CANONICAL_ID["pancreas"]}
_CROSS = ndimage.generate_binary_structure(3, 1)


def _name(label: int) -> str:
    return CANONICAL_ORGANS[label] if label < len(CANONICAL_ORGANS) else str(label)


def _rotation(axial_deg: float, tilt_h_deg: float, tilt_w_deg: float) -> np.ndarray:
    """3x3 rotation in (D, H, W) mm coordinates: about D (in-plane), then about H and W (tilts)."""

    def rot(i: int, j: int, deg: float) -> np.ndarray:
        r = np.eye(3)
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    return rot(0, 2, tilt_w_deg) @ rot(0, 1, tilt_h_deg) @ rot(1, 2, axial_deg)


def _draw_spatial(shape: tuple[int, ...], cfg: AugmentConfig, rng: np.random.Generator) -> dict[str, Any]:
    g = cfg.elastic_grid
    return {
        "rotate_deg": float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)),
        "tilt_deg": [float(x) for x in rng.uniform(-cfg.rotate_deg / 4, cfg.rotate_deg / 4, size=2)],
        "scale": float(rng.uniform(*cfg.scale)),
        "translate_mm": [float(x) for x in rng.uniform(-cfg.translate_mm, cfg.translate_mm, size=3)],
        "elastic": rng.uniform(-cfg.elastic_mm, cfg.elastic_mm, size=(3, g, g, g)),  # (D, H, W) mm
    }


def _output_box(
    mask: np.ndarray, spacing: np.ndarray, fwd: np.ndarray, p: dict[str, Any], elastic_mm: float
) -> tuple[slice, ...] | None:
    """Output voxels that can receive an organ: the source organs' box grown by the largest elastic
    displacement, pushed forward through the affine, plus a margin (morphology grows organs by one)."""
    organs = mask != 0
    if not organs.any():
        return None
    shape = np.array(mask.shape)
    centre = (shape - 1) / 2
    box = _box(organs, 0)
    lo = (np.array([b.start for b in box]) - centre) * spacing - elastic_mm
    hi = (np.array([b.stop - 1 for b in box]) - centre) * spacing + elastic_mm
    corners = np.array([[hi[i] if c >> i & 1 else lo[i] for i in range(3)] for c in range(8)])
    moved = corners @ fwd.T + np.asarray(p["translate_mm"])  # (8, 3) output mm
    first = np.floor(moved.min(0) / spacing + centre).astype(int) - 2
    last = np.ceil(moved.max(0) / spacing + centre).astype(int) + 3
    first, last = np.maximum(first, 0), np.minimum(last, shape)
    if np.any(last <= first):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(first, last, strict=True))


def _linear_weights(n: int, g: int, idx: np.ndarray) -> np.ndarray:
    """(len(idx), g) weights that linearly interpolate g control points spanning n voxels at idx."""
    f = idx * ((g - 1) / max(n - 1, 1))
    i0 = np.clip(np.floor(f).astype(int), 0, g - 2) if g > 1 else np.zeros(idx.size, dtype=int)
    w = np.zeros((idx.size, g))
    t = f - i0
    rows = np.arange(idx.size)
    w[rows, i0] = 1 - t if g > 1 else 1.0
    if g > 1:
        w[rows, i0 + 1] = t
    return w


def _resample(
    mask: np.ndarray, spacing: np.ndarray, p: dict[str, Any], elastic_mm: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Nearest-neighbour resampling of a (D, H, W) label map through the drawn transform.

    Returns (box, labels inside box); every output voxel outside the box is background. Only the box is
    computed: the work follows the organs, not the field of view. Plain numpy (single-threaded): torch's
    thread pool stalls badly on the small, shared CPUs this runs on in CI.
    """
    shape = np.array(mask.shape)
    centre = (shape - 1) / 2
    fwd = _rotation(p["rotate_deg"], *p["tilt_deg"]) * p["scale"]
    box = _output_box(mask, spacing, fwd, p, elastic_mm)
    if box is None:
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), dtype=mask.dtype)
    inv = np.linalg.inv(fwd)  # output mm -> source mm (pull-back)
    shift = inv @ np.asarray(p["translate_mm"])
    idx = [np.arange(b.start, b.stop) for b in box]
    q = [((i - c) * s).astype(np.float32) for i, c, s in zip(idx, centre, spacing, strict=True)]
    qd, qh, qw = q[0][:, None, None], q[1][None, :, None], q[2][None, None, :]
    # the coarse elastic field, trilinear on the box lattice: separable, one weight matrix per axis
    g = p["elastic"].shape[1]
    wd, wh, ww = (_linear_weights(int(n), g, i) for n, i in zip(shape, idx, strict=True))
    disp = np.einsum("ai,bj,ck,xijk->xabc", wd, wh, ww, p["elastic"], optimize=True).astype(np.float32)
    src = []
    for c in range(3):
        mm = inv[c, 0] * qd + inv[c, 1] * qh + inv[c, 2] * qw + (disp[c] - shift[c])
        src.append(np.rint(mm / spacing[c] + centre[c]).astype(np.int64))
    inside = np.ones(src[0].shape, dtype=bool)
    for c in range(3):
        inside &= (src[c] >= 0) & (src[c] < shape[c])
        np.clip(src[c], 0, shape[c] - 1, out=src[c])
    out = np.where(inside, mask[src[0], src[1], src[2]], 0).astype(mask.dtype)
    return box, out


def _box(a: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of the True voxels (there must be some), grown by ``margin`` within the array."""
    out = []
    for axis, n in enumerate(a.shape):
        hit = np.flatnonzero(a.any(axis=tuple(i for i in range(a.ndim) if i != axis)))
        out.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)))
    return tuple(out)


def _morph(out: np.ndarray, label: int, dilate: bool) -> None:
    """One-voxel 6-connected dilation (into background only) or erosion of one organ, in place."""
    organ = out == label
    box = _box(organ, 1)
    sub, org = out[box], organ[box]
    if dilate:
        sub[ndimage.binary_dilation(org, _CROSS) & (sub == 0)] = label
    else:
        sub[org & ~ndimage.binary_erosion(org, _CROSS, border_value=1)] = PARENT.get(label, 0)


def augment_mask(
    mask: np.ndarray, spacing: Any, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """One augmented mask from a canonical (D, H, W) integer mask; returns (mask, JSON-able record).

    spacing: (D, H, W) voxel size in mm. The output has the source's shape and dtype.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.dtype.kind not in "iu":
        raise InputError(f"augment_mask needs a (D, H, W) integer mask, got {mask.dtype} {mask.shape}")
    if mask.size and mask.min() < 0:
        raise InputError(f"mask holds negative labels (min {mask.min()}); use canonical ids 0, 1, 2, ...")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or np.any(sp <= 0):
        raise InputError(f"spacing must be three positive mm values (D, H, W), got {spacing!r}")
    lo, hi = cfg.volume_range
    if not 0 < lo <= 1 <= hi:
        raise ConfigError(f"augment.volume_range must satisfy 0 < low <= 1 <= high, got {cfg.volume_range}")

    src_counts = np.bincount(mask.ravel())
    organs = [k for k in np.flatnonzero(src_counts) if k != 0]
    checked = [k for k in organs if src_counts[k] >= MIN_CHECKED_VOXELS]

    def ratios(sub: np.ndarray) -> np.ndarray:
        counts = np.bincount(sub.ravel(), minlength=src_counts.size)[: src_counts.size]
        return counts / np.maximum(src_counts, 1)

    for draw in range(1, MAX_DRAWS + 1):  # noqa: B007 (read after the loop: draws used)
        params = _draw_spatial(mask.shape, cfg, rng)
        box, sub = _resample(mask, sp, params, cfg.elastic_mm)
        r = ratios(sub)
        bad = [k for k in checked if not lo <= r[k] <= hi]
        if not bad:
            break
    else:
        raise ConfigError(
            f"could not keep {_name(int(bad[0]))} within volume_range {cfg.volume_range} in {MAX_DRAWS} "
            f"draws (last ratio {r[bad[0]]:.2f}); widen augment.volume_range or reduce scale/elastic_mm"
        )

    # morphology and removal work inside the box: it has a two-voxel margin around every organ
    morph: dict[str, str] = {}
    for k in organs:
        if rng.random() >= cfg.morph_prob or not (sub == k).any():
            continue
        dilate = bool(rng.random() < 0.5)
        trial = sub.copy()
        _morph(trial, int(k), dilate)
        if all(lo <= x <= hi for x in ratios(trial)[checked]):
            sub = trial
            morph[_name(int(k))] = "dilate" if dilate else "erode"
        else:
            morph[_name(int(k))] = "skipped"

    drop = [int(k) for k in organs if cfg.remove_prob > 0 and rng.random() < cfg.remove_prob]
    for k in sorted(drop, key=lambda k: k not in PARENT):  # children first: a removed lesion's voxels
        sub[sub == k] = PARENT.get(k, 0)  # go to the pancreas, and leave with it if it goes too
    removed = [_name(k) for k in drop]

    final = ratios(sub)
    out = np.zeros_like(mask)
    out[box] = sub
    record = {
        "draws": draw,
        "rotate_deg": round(params["rotate_deg"], 4),
        "tilt_deg": [round(x, 4) for x in params["tilt_deg"]],
        "scale": round(params["scale"], 5),
        "translate_mm": [round(x, 3) for x in params["translate_mm"]],
        "elastic_grid": cfg.elastic_grid,
        "elastic_rms_mm": round(float(np.sqrt(np.mean(params["elastic"] ** 2))), 4),
        "morph": morph,
        "removed": removed,
        "volume_ratio": {_name(int(k)): round(float(final[k]), 4) for k in organs},
    }
    return out, record


def augment_many(
    mask: np.ndarray, spacing: Any, cfg: AugmentConfig, seed: int, n: int
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """``n`` augmentations; result k uses ``np.random.default_rng([seed, k])`` whatever ``n`` is."""
    if n < 0:
        raise ConfigError(f"n must be non-negative, got {n}")
    out = []
    for k in range(n):
        m, rec = augment_mask(mask, spacing, cfg, np.random.default_rng([seed, k]))
        out.append((m, {"seed": seed, "index": k, **rec}))
    return out
