"""lad_fast.conditioning.topology: the fast paths against gudhi, and the official reference vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lad_fast.conditioning.topology import (
    betti_3d,
    betti_3d_gudhi,
    lad_structure_vector,
    lad_structure_vector_gudhi,
)
from lad_fast.errors import ConfigError, InputError

CLASSES = (0, 1, 2, 3)


def _reference_case(shared):
    ref = shared / "lad_reference"
    return np.load(ref / "Case_00001_mask.npy"), np.load(ref / "Case_00001_topo.npy")


def test_reference_case_fast_path_is_bit_exact(shared):
    mask, topo = _reference_case(shared)
    vec = lad_structure_vector(mask)
    assert vec.dtype == np.int64 and vec.shape == (192,)
    np.testing.assert_array_equal(vec, topo)


def test_reference_case_gudhi_semantics_on_the_lesion_slices(shared):
    # the slices with pancreas holes and lesions are where a wrong convention would show; the whole case
    # through gudhi takes ~10 s, so check the oracle on these five (14..18) only
    mask, topo = _reference_case(shared)
    want = topo.reshape(32, 6)[14:19].reshape(-1)
    np.testing.assert_array_equal(lad_structure_vector_gudhi(mask[14:19]), want)
    np.testing.assert_array_equal(lad_structure_vector(torch.from_numpy(mask[14:19]), impl="torch"), want)


def _special(kind: str, shape: tuple[int, ...], labels: np.ndarray, k: int) -> np.ndarray:
    if kind == "empty":
        return np.zeros(shape, dtype=np.uint8)
    if kind == "full":
        return np.full(shape, k, dtype=np.uint8)
    if kind == "checkerboard":
        return (np.indices(shape).sum(0) % 2 * k).astype(np.uint8)
    if kind == "single":
        out = np.zeros(shape, dtype=np.uint8)
        out[tuple(int(labels.sum() + 7 * i) % n for i, n in enumerate(shape))] = k
        return out
    if kind == "border":  # a ring on the outer border of every slice, with random labels inside
        out = labels.copy()
        out[..., 0, :] = out[..., -1, :] = out[..., :, 0] = out[..., :, -1] = k
        return out
    return labels


def _masks(ndim: int, max_side: int):
    shapes = st.tuples(*[st.integers(1, max_side)] * ndim)
    return st.builds(
        lambda shape, seed, p, kind, k: _special(
            kind,
            shape,
            (np.random.default_rng(seed).random(shape) < p)
            * np.random.default_rng(seed + 1).integers(1, 4, shape),
            k,
        ).astype(np.uint8),
        shapes,
        st.integers(0, 2**31),
        st.floats(0.0, 1.0),
        st.sampled_from(["random", "random", "random", "empty", "full", "checkerboard", "single", "border"]),
        st.integers(0, 3),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_masks(3, 9))
def test_slice_vector_equals_gudhi(mask):
    want = lad_structure_vector_gudhi(mask, CLASSES)
    np.testing.assert_array_equal(lad_structure_vector(mask, CLASSES), want)
    np.testing.assert_array_equal(lad_structure_vector(torch.from_numpy(mask), CLASSES, impl="torch"), want)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_masks(3, 6))
def test_betti_3d_equals_gudhi(mask):
    np.testing.assert_array_equal(betti_3d(mask, CLASSES), betti_3d_gudhi(mask, CLASSES))


def test_betti_3d_known_shapes():
    hollow = np.ones((5, 5, 5), dtype=np.uint8)
    hollow[2, 2, 2] = 0  # a cavity
    ring = np.zeros((3, 7, 7), dtype=np.uint8)
    ring[1, 1:6, 1:6] = 1
    ring[1, 2:5, 2:5] = 0  # a solid torus
    got = np.concatenate([betti_3d(hollow, (1,)), betti_3d(ring, (1,)), betti_3d(ring, (5,))])
    np.testing.assert_array_equal(got, [[1, 0, 1], [1, 1, 0], [1, 0, 0]])


def test_any_number_of_classes_and_slices_and_inputs():
    rng = np.random.default_rng(3)
    mask = rng.integers(0, 7, (11, 12, 10))
    classes = (6, 0, 9, 2, 2)  # any order, absent classes, repeats
    want = lad_structure_vector_gudhi(mask, classes)
    assert want.shape == (11 * 5 * 2,)
    np.testing.assert_array_equal(lad_structure_vector(mask, classes), want)
    np.testing.assert_array_equal(lad_structure_vector(mask.astype(np.float32), classes), want)
    np.testing.assert_array_equal(lad_structure_vector(torch.from_numpy(mask), classes), want)
    np.testing.assert_array_equal(lad_structure_vector(mask[0], classes), want[:10])  # one (H, W) slice


def test_empty_mask_is_one_zero_everywhere():
    vec = lad_structure_vector(np.zeros((4, 8, 8), dtype=np.uint8), classes=(1, 2))
    np.testing.assert_array_equal(vec.reshape(-1, 2), np.tile([1, 0], (8, 1)))


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_float_mask_with_fractions_is_rejected(impl):
    with pytest.raises(InputError, match="non-integer values"):
        lad_structure_vector(np.full((2, 4, 4), 0.5, dtype=np.float32), impl=impl)


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_negative_labels_are_rejected(impl):
    mask = np.zeros((2, 4, 4), dtype=np.int16)
    mask[0, 0, 0] = -1
    with pytest.raises(InputError, match="negative labels"):
        lad_structure_vector(mask, impl=impl)


def test_bad_arguments_are_rejected():
    with pytest.raises(InputError, match="2 or 3 dimensions"):
        lad_structure_vector(np.zeros((2, 2, 2, 2), dtype=np.uint8))
    with pytest.raises(InputError, match="3 dimensions"):
        betti_3d(np.zeros((4, 4), dtype=np.uint8), (0,))
    with pytest.raises(InputError, match="integer labels"):
        lad_structure_vector(np.zeros((2, 2), dtype=np.complex64))
    with pytest.raises(ConfigError, match="impl must be one of"):
        lad_structure_vector(np.zeros((2, 2), dtype=np.uint8), impl="cuda")
    with pytest.raises(ConfigError, match="at least one label"):
        lad_structure_vector(np.zeros((2, 2), dtype=np.uint8), classes=())
