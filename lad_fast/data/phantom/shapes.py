"""Analytic shape primitives for the procedural phantoms, evaluated on a world-mm voxel grid.

Everything here works on a :class:`Canvas`: warped world coordinates ``X, Y, Z`` (mm, RAS: x toward the
patient's right, y anterior, z superior) over the canonical ``(D, H, W)`` grid, plus the tissue and
label maps that anatomy code paints into. Shapes are evaluated only inside a bounding box, so a small
organ costs only its own voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box = tuple[slice, slice, slice]


def smooth_field(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    wavelength_mm: float,
    terms: int = 6,
) -> np.ndarray:
    """A random low-frequency field of unit RMS on the grid, ``(D, H, W)`` float32.

    A sum of separable cosine products: each term is an outer product of three 1D arrays, so the field
    costs a few full-grid multiplies whatever its smoothness (no FFT, no upsampling).
    """
    out = np.zeros((z.size, y.size, x.size), np.float32)
    for _ in range(terms):
        k = rng.normal(size=3)
        k *= 2 * math.pi / wavelength_mm / max(float(np.linalg.norm(k)), 1e-3) * rng.uniform(0.6, 1.4)
        phase = rng.uniform(0, 2 * math.pi, size=3)
        cz = np.cos(k[2] * z + phase[2]).astype(np.float32)[:, None, None]
        cy = np.cos(k[1] * y + phase[1]).astype(np.float32)[None, :, None]
        cx = np.cos(k[0] * x + phase[0]).astype(np.float32)[None, None, :]
        out += cz * cy * cx
    # Each product of three cosines has mean square 1/8.
    return out * np.float32(math.sqrt(8.0 / terms))


class Canvas:
    """Warped coordinates of a ``(D, H, W)`` grid and the tissue / label maps being painted."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, warp: tuple[np.ndarray, np.ndarray]):
        self.x, self.y, self.z = x, y, z  # 1D world coordinates of the W, H, D indices (mm)
        shape = (z.size, y.size, x.size)
        self.X = (x[None, None, :] + warp[0]).astype(np.float32)  # (D, H, W)
        self.Y = (y[None, :, None] + warp[1]).astype(np.float32)
        self.Z = np.broadcast_to(z.astype(np.float32)[:, None, None], shape)
        self.margin = float(max(np.abs(warp[0]).max(), np.abs(warp[1]).max())) + 1.0
        self.tissue = np.zeros(shape, np.uint8)
        self.labels = np.zeros(shape, np.uint8)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        """Index slices covering world ``lo..hi`` = (x, y, z) mm (plus the warp), or None if outside."""
        out = []
        for axis, a, b, m in (
            (self.z, lo[2], hi[2], 0.0),
            (self.y, lo[1], hi[1], self.margin),
            (self.x, lo[0], hi[0], self.margin),
        ):
            step = abs(float(axis[1] - axis[0])) if axis.size > 1 else 1.0
            i0 = int(np.searchsorted(axis, a - m - step))
            i1 = int(np.searchsorted(axis, b + m + step))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return (out[0], out[1], out[2])

    def coords(self, sl: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.X[sl], self.Y[sl], self.Z[sl]

    def paint(
        self,
        sl: Box,
        inside: np.ndarray,
        tissue: int,
        label: int | None = None,
        only: Sequence[int] | None = None,
    ) -> None:
        """Set ``tissue`` (and ``label``) where ``inside``; ``only`` restricts it to those tissues."""
        if only is not None:
            inside = inside & np.isin(self.tissue[sl], np.asarray(only, np.uint8))
        self.tissue[sl][inside] = tissue
        if label is not None:
            self.labels[sl][inside] = label


def ellipsoid(
    cv: Canvas,
    center: Sequence[float],
    radii: Sequence[float],
    angle_deg: float = 0.0,
    bumps: np.ndarray | None = None,
    amp: float = 0.0,
) -> tuple[Box, np.ndarray] | None:
    """Normalised radius ``q`` (inside where ``q < 1``) of a z-aligned ellipsoid, rotated in-plane.

    ``radii[2]`` may be ``inf`` for an infinite tube along z. ``bumps`` (a full-grid smooth field) times
    ``amp`` perturbs the surface. Returns the box and ``q`` inside it, or None when outside the grid.
    """
    r = max(radii[0], radii[1])
    lo = (center[0] - r, center[1] - r, center[2] - radii[2])
    hi = (center[0] + r, center[1] + r, center[2] + radii[2])
    sl = cv.box(lo, hi)
    if sl is None:
        return None
    X, Y, Z = cv.coords(sl)
    dx, dy = X - np.float32(center[0]), Y - np.float32(center[1])
    if angle_deg:
        c, s = np.float32(math.cos(math.radians(angle_deg))), np.float32(math.sin(math.radians(angle_deg)))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    q = (dx / np.float32(radii[0])) ** 2 + (dy / np.float32(radii[1])) ** 2
    if math.isfinite(radii[2]):
        q = q + ((Z - np.float32(center[2])) / np.float32(radii[2])) ** 2
    if bumps is not None and amp:
        q = q * (1.0 + np.float32(amp) * bumps[sl])
    return sl, q


def catmull_rom(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points along a Catmull-Rom spline through ``points`` (P, 3); returns (n, 3)."""
    p = np.concatenate([2 * points[:1] - points[1:2], points, 2 * points[-1:] - points[-2:-1]])
    segs = len(points) - 1
    t = np.linspace(0, segs, n)
    i = np.minimum(t.astype(int), segs - 1)
    u = (t - i)[:, None]
    p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
    return 0.5 * (
        2 * p1 + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * u**3
    )


def tube(
    cv: Canvas, path: np.ndarray, radii: np.ndarray, z_stretch: float = 1.0
) -> tuple[Box, np.ndarray, np.ndarray] | None:
    """Normalised distance to a tube of varying radius around ``path`` (N, 3) with ``radii`` (N,).

    Returns the box, ``q`` = min over samples of |p - s_i| / r_i (inside where ``q < 1``) and the
    index of the nearest sample (so callers can cut gaps or vary tissue along the tube). ``z_stretch``
    > 1 makes the cross-section taller along z than wide.
    """
    rmax = float(radii.max())
    lo, hi = path.min(0) - rmax, path.max(0) + rmax
    lo[2] -= rmax * (z_stretch - 1)
    hi[2] += rmax * (z_stretch - 1)
    sl = cv.box(lo, hi)
    if sl is None:
        return None
    X, Y, Z = cv.coords(sl)
    best = np.full(X.shape, np.inf, np.float32)
    arg = np.zeros(X.shape, np.int32)
    for i, (p, r) in enumerate(zip(path.astype(np.float32), radii.astype(np.float32), strict=True)):
        d2 = ((X - p[0]) ** 2 + (Y - p[1]) ** 2 + ((Z - p[2]) / np.float32(z_stretch)) ** 2) / (r * r)
        closer = d2 < best
        best = np.where(closer, d2, best)
        arg[closer] = i
    return sl, np.sqrt(best), arg
