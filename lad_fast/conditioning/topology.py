"""Betti-number structure conditions (docs/lad.md, "Structure condition"), exact and fast.

The official Lad code builds, for every axial slice and every class k, a gudhi cubical complex whose
top-dimensional cells (pixels) of class k have filtration value 0 and all others 1, computes persistence
(gudhi's default ``min_persistence=0`` drops zero-length pairs) and counts the dimension-0 and -1 pairs,
infinite ones included. Worked out against the official vector of an AbdomenCT-1K case
(tests/conditioning/test_topology.py), that is:

* lower-dimensional cells take the minimum of their cofaces, so the value-0 sublevel set X is the
  closure of the class-k pixels, and the whole complex (a filled rectangle) is contractible;
* dimension 0: one pair per connected component of X (8-connectivity of pixels: squares touching at a
  corner share a vertex), one of them infinite; when class k is absent there is still the infinite pair
  born at value 1, hence ``b0 = max(#components, 1)``;
* dimension 1: one pair per hole of X (every hole dies at 1), i.e. per 4-connected component of the
  other pixels that does not touch the slice border; pairs born at 1 have zero length and are dropped.

The fast path never builds a complex. With chi = V - E + F, the Euler characteristic of X counted from
its cells, ``b0 - b1 = chi``; one component labelling gives one Betti number and chi the other. Which
side is labelled is chosen per class: the class itself when it is small (organs), its complement when
that is small (background), each cropped to its bounding box over all slices, so the work scales with
the organs, not the field of view. Every slice of every class is labelled in one ``scipy.ndimage.label``
call whose structuring element does not connect slices.

``betti_3d`` extends this to volumes: b0 = 26-connected components, b2 = 6-connected components of the
complement that do not touch the volume border, b1 = b0 + b2 - chi with chi = V - E + F - C.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from lad_fast.errors import ConfigError, InputError

IMPLS = ("auto", "numpy", "torch")

# In-plane structuring elements embedded in 3D: the middle plane only, so slices never connect.
_S8 = np.zeros((3, 3, 3), dtype=bool)
_S8[1] = True
_S4 = np.zeros((3, 3, 3), dtype=bool)
_S4[1] = ndimage.generate_binary_structure(2, 1)


# ----------------------------------------------------------------------------------------------------
# input validation


def _as_label_array(mask: Any, ndim: tuple[int, ...]) -> np.ndarray:
    """Validate a label map (numpy or CPU torch) and return it as a non-negative integer numpy array."""
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):  # torch tensor, imported lazily by the caller
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim not in ndim:
        raise InputError(f"mask must have {' or '.join(map(str, ndim))} dimensions, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError(
                "mask holds non-integer values (a float mask of probabilities?); pass integer labels, "
                "e.g. mask.argmax(0) or np.rint(mask)"
            )
    elif arr.dtype.kind not in "iu":
        raise InputError(f"mask must hold integer labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise InputError(f"mask holds negative labels (min {arr.min()}); labels must be 0, 1, 2, ...")
    return arr.astype(np.int64, copy=False) if arr.dtype.kind == "f" else arr


def _check_classes(classes: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in classes)
    if not out:
        raise ConfigError("classes must name at least one label value")
    if any(k < 0 for k in out):
        raise ConfigError(f"classes must be non-negative label values, got {out}")
    return out


# ----------------------------------------------------------------------------------------------------
# gudhi reference (the oracle)


def _gudhi_counts(values: np.ndarray, dims: int) -> list[int]:
    import gudhi  # the reference only; the fast path does not need it

    cc = gudhi.CubicalComplex(top_dimensional_cells=values)
    pairs = cc.persistence()  # min_persistence=0: zero-length pairs dropped, as the official code does
    return [sum(1 for d, _ in pairs if d == k) for k in range(dims)]


def lad_structure_vector_gudhi(mask: Any, classes: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """The official Lad structure vector, computed with gudhi (slow; the reference and test oracle).

    mask: (D, H, W) integer labels (or (H, W), one slice). Returns int64 of length D * len(classes) * 2,
    slice-major, then class, then (b0, b1).
    """
    arr = _as_label_array(mask, (2, 3))
    arr = arr[None] if arr.ndim == 2 else arr
    classes = _check_classes(classes)
    out = [_gudhi_counts(np.where(sl == k, 0.0, 1.0), 2) for sl in arr for k in classes]
    return np.asarray(out, dtype=np.int64).reshape(-1)


def betti_3d_gudhi(mask: Any, classes: Sequence[int]) -> np.ndarray:
    """Per-class 3D (b0, b1, b2) from gudhi 3D cubical complexes, same filtration: (len(classes), 3)."""
    arr = _as_label_array(mask, (3,))
    classes = _check_classes(classes)
    return np.asarray([_gudhi_counts(np.where(arr == k, 0.0, 1.0), 3) for k in classes], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# fast numpy path


def _bbox(a: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels of a 3D array, or None when there are none."""
    box = []
    for axis in range(a.ndim):
        hit = np.flatnonzero(a.any(axis=tuple(i for i in range(a.ndim) if i != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _box_size(box: tuple[slice, ...] | None) -> int:
    return 0 if box is None else int(np.prod([s.stop - s.start for s in box]))


def _components_per_slice(a: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Number of in-plane components on every slice of a (S, H, W) bool array: (S,) int64."""
    labels, n = ndimage.label(a, structure=structure)
    if n == 0:
        return np.zeros(a.shape[0], dtype=np.int64)
    # find_objects gives each label's box; its first-axis start is the slice it lives on (slices never
    # connect), so this stays exact whatever order ndimage numbers the labels in.
    starts = np.fromiter((obj[0].start for obj in ndimage.find_objects(labels)), dtype=np.int64, count=n)
    return np.bincount(starts, minlength=a.shape[0]).astype(np.int64)


def _window_any(p: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """OR of each length-2 window along ``axes`` (each listed axis shrinks by one)."""
    for ax in axes:
        lo = [slice(None)] * p.ndim
        hi = [slice(None)] * p.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        p = p[tuple(lo)] | p[tuple(hi)]
    return p


def _window_all(p: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return ~_window_any(~p, axes)


def _interior(p: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Drop the one-cell padding on ``axes``."""
    sl = [slice(None)] * p.ndim
    for ax in axes:
        sl[ax] = slice(1, -1)
    return p[tuple(sl)]


def _euler_closure(p: np.ndarray, cell_axes: tuple[int, ...], reduce: Any) -> np.ndarray:
    """Euler characteristic of cells around a padded bool array, per index of the non-cell axes.

    ``p`` is padded by one on every axis of ``cell_axes``. A cell of the grid (a vertex, edge, face ...)
    spans the pixels around it: along an axis where the cell is a vertex, two neighbouring pixels;
    along one where it is an interval, the one pixel itself. ``reduce`` (_window_any or _window_all)
    decides whether the cell is counted when any (closure of the set) or all (interior of the
    complement) of those pixels are True. Sum over cell dimensions with alternating signs.
    """
    sum_axes = tuple(cell_axes)
    chi = np.zeros([p.shape[i] for i in range(p.ndim) if i not in cell_axes], dtype=np.int64)
    for bits in range(1 << len(cell_axes)):  # bit i set: the cell is an interval along cell_axes[i]
        interval = tuple(ax for i, ax in enumerate(cell_axes) if bits >> i & 1)
        vertex = tuple(ax for ax in cell_axes if ax not in interval)
        # interval axes: the pixel itself (strip the padding); vertex axes: pairs of padded neighbours
        q = reduce(_interior(p, interval), vertex)
        sign = 1 if len(interval) % 2 == 0 else -1
        chi += sign * q.sum(axis=sum_axes, dtype=np.int64)
    return chi


def _pad_hw(a: np.ndarray, value: bool | tuple[tuple[bool, bool], tuple[bool, bool]]) -> np.ndarray:
    """Pad a (S, H, W) bool array by one pixel in H and W; per-side values ((top, bottom), (left, right))."""
    if isinstance(value, bool):
        return np.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=value)
    out = np.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    (top, bottom), (left, right) = value
    out[:, 0, :], out[:, -1, :] = top, bottom
    out[:, :, 0], out[:, :, -1] = left, right
    return out


def _betti_2d_class(a: np.ndarray) -> np.ndarray:
    """(D, 2) per-slice (b0 without the absent-class floor, b1) of one class given as a (D, H, W) bool."""
    d, h, w = a.shape
    out = np.zeros((d, 2), dtype=np.int64)
    box_a = _bbox(a)
    if box_a is None:
        return out
    comp = ~a
    box_b = _bbox(comp)
    if box_b is None:  # the class fills every slice
        out[:, 0] = 1
        return out
    if _box_size(box_a) <= _box_size(box_b):
        # label the class: b0 = 8-components, chi of its closure, b1 = b0 - chi
        crop = a[box_a]
        b0 = _components_per_slice(crop, _S8)
        chi = _euler_closure(_pad_hw(crop, False), (1, 2), _window_any)
        out[box_a[0], 0] = b0
        out[box_a[0], 1] = b0 - chi
        return out
    # label the complement: b1 = its 4-components away from the border, chi(closure) = 1 - chi(interior
    # of the complement); the rectangle has chi 1 and splits into the closure and that open rest.
    zs, ys, xs = box_b
    # one margin pixel (all class k: it lies outside the complement's box on every slice) keeps the
    # border ring below away from components that do not reach the true border
    y0, y1 = max(ys.start - 1, 0), min(ys.stop + 1, h)
    x0, x1 = max(xs.start - 1, 0), min(xs.stop + 1, w)
    crop = comp[zs, y0:y1, x0:x1]
    ringed = _pad_hw(crop, True)  # every border-touching component joins the ring: one per slice
    b1 = _components_per_slice(ringed, _S4) - 1
    # outside the image the complement goes on (value 1 cells); outside the crop but inside it is class k
    sides = ((y0 == 0, y1 == h), (x0 == 0, x1 == w))
    chi_open = _euler_closure(_pad_hw(crop, sides), (1, 2), _window_all)
    chi = 1 - chi_open
    out[:, 0] = 1  # slices outside the box are all class k
    out[zs, 0] = chi + b1
    out[zs, 1] = b1
    return out


def _structure_numpy(arr: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    per_class = [_betti_2d_class(arr == k) for k in classes]  # each (D, 2)
    out = np.stack(per_class, axis=1)  # (D, K, 2)
    out[..., 0] = np.maximum(out[..., 0], 1)  # the infinite pair born at 1 when the class is absent
    return out.reshape(-1)


# ----------------------------------------------------------------------------------------------------
# torch path (the GPU path for CUDA tensors; also runs on CPU, which is how it is tested)


def _structure_torch(mask: Any, classes: tuple[int, ...]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    m = mask if mask.ndim == 3 else mask[None]
    if m.is_floating_point():
        if not bool(torch.isfinite(m).all()) or bool((m != m.round()).any()):
            raise InputError(
                "mask holds non-integer values (a float mask of probabilities?); pass integer labels, "
                "e.g. mask.argmax(0) or mask.round()"
            )
    if m.numel() and int(m.min()) < 0:
        raise InputError(f"mask holds negative labels (min {int(m.min())}); labels must be 0, 1, 2, ...")
    d, h, w = m.shape
    cls = torch.tensor(classes, device=m.device, dtype=m.dtype)
    a = (m[None] == cls.view(-1, 1, 1, 1)).reshape(-1, 1, h, w)  # (K*D, 1, H, W)
    af = a.float()
    # chi of the closure: cells counted when any adjacent pixel is in the class (max-pool = OR)
    p = F.pad(af, (1, 1, 1, 1))
    v = F.max_pool2d(p, 2, stride=1).sum((1, 2, 3))
    e = F.max_pool2d(p[:, :, 1:-1, :], (1, 2), stride=1).sum((1, 2, 3))
    e = e + F.max_pool2d(p[:, :, :, 1:-1], (2, 1), stride=1).sum((1, 2, 3))
    chi = (v - e + af.sum((1, 2, 3))).round().long()
    # b0: 8-connected labelling by max-propagation plus pointer jumping. Labels are 1 + flat index;
    # a component ends with the largest index it holds, and its root is the pixel holding its own label.
    n = a.shape[0] * h * w
    idx = torch.arange(1, n + 1, device=m.device, dtype=torch.float64 if n >= 2**24 else torch.float32)
    lab = torch.where(a.reshape(-1), idx, torch.zeros_like(idx)).view(-1, 1, h, w)
    while True:
        new = F.max_pool2d(lab, 3, stride=1, padding=1) * a
        flat = new.reshape(-1)
        jumped = torch.where(flat > 0, flat[(flat.long() - 1).clamp(min=0)], flat)
        new = jumped.view_as(lab)
        if torch.equal(new, lab):
            break
        lab = new
    roots = (lab.reshape(-1) == idx) & a.reshape(-1)
    b0 = roots.view(-1, h * w).sum(1)
    b1 = b0 - chi
    out = torch.stack([b0.clamp(min=1), b1], dim=1).view(len(classes), d, 2).transpose(0, 1)
    return out.reshape(-1).cpu().numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# public API


def lad_structure_vector(mask: Any, classes: Sequence[int] = (0, 1, 2), impl: str = "auto") -> np.ndarray:
    """The official Lad structure vector, exact, fast.

    mask: (D, H, W) integer labels (or (H, W), one slice) as a numpy array or torch tensor. Returns int64
    of length D * len(classes) * 2: slice-major, then class, then (b0, b1); an absent class gives (1, 0).
    Equal, bit for bit, to :func:`lad_structure_vector_gudhi`.

    impl: "numpy" (cropped component labelling and Euler characteristics, the CPU path), "torch"
    (label propagation with torch ops: the GPU path for CUDA tensors, also runs on CPU), or "auto"
    (torch for CUDA tensors, numpy otherwise).
    """
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    classes = _check_classes(classes)
    is_torch = hasattr(mask, "detach") and hasattr(mask, "is_cuda")
    if impl == "auto":
        impl = "torch" if is_torch and mask.is_cuda else "numpy"
    if impl == "torch":
        import torch

        t = mask if is_torch else torch.as_tensor(np.asarray(mask))
        if t.ndim not in (2, 3):
            raise InputError(f"mask must have 2 or 3 dimensions, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if not t.is_floating_point() and t.dtype not in (torch.uint8,):
            t = t.to(torch.int64)
        return _structure_torch(t, classes)
    arr = _as_label_array(mask, (2, 3))
    arr = arr[None] if arr.ndim == 2 else arr
    return _structure_numpy(arr, classes)


def betti_3d(mask: Any, classes: Sequence[int]) -> np.ndarray:
    """Per-class 3D Betti numbers (b0, b1, b2) of the closure of each class's voxels.

    mask: (D, H, W) integer labels, numpy or torch. Returns int64 (len(classes), 3), equal to
    :func:`betti_3d_gudhi` (an absent class gives (1, 0, 0), like the 2D vector).
    """
    arr = _as_label_array(mask, (3,))
    classes = _check_classes(classes)
    out = np.zeros((len(classes), 3), dtype=np.int64)
    full = np.ones((3, 3, 3), dtype=bool)
    s6 = ndimage.generate_binary_structure(3, 1)
    for i, k in enumerate(classes):
        a = arr == k
        box = _bbox(a)
        if box is None:
            out[i] = (1, 0, 0)
            continue
        crop = a[box]
        b0 = int(ndimage.label(crop, structure=full)[1])
        chi = int(_euler_closure(np.pad(crop, 1)[None], (1, 2, 3), _window_any)[0])
        # cavities: complement components that miss the border; a margin of the complement around the
        # box (where the box is not at the border) connects to everything outside, then a ring of
        # complement around that stands for the world outside the volume.
        lo = [max(s.start - 1, 0) for s in box]
        hi = [min(s.stop + 1, n) for s, n in zip(box, arr.shape, strict=True)]
        comp = ~a[tuple(slice(x, y) for x, y in zip(lo, hi, strict=True))]
        b2 = int(ndimage.label(np.pad(comp, 1, constant_values=True), structure=s6)[1]) - 1
        out[i] = (b0, b0 + b2 - chi, b2)
    return out
