"""lad_fast.conditioning.conditions: structure condition, its length and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lad_fast.conditioning.conditions import (
    normalize_structure,
    structure_classes,
    structure_condition,
    structure_dim,
)
from lad_fast.conditioning.topology import betti_3d_gudhi, lad_structure_vector_gudhi
from lad_fast.config import ConditionConfig
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.errors import ConfigError, InputError


def _canonical_lad_case(shared) -> tuple[np.ndarray, np.ndarray]:
    ref = shared / "lad_reference"
    lut = np.array([0, CANONICAL_ID["pancreas"], CANONICAL_ID["pancreatic_lesion"]], dtype=np.uint8)
    return lut[np.load(ref / "Case_00001_mask.npy")], np.load(ref / "Case_00001_topo.npy")


def test_lad_case_through_canonical_ids_gives_the_official_vector(shared):
    mask, topo = _canonical_lad_case(shared)
    np.testing.assert_array_equal(structure_condition(mask, ConditionConfig()), topo)


def test_background_means_every_unlisted_organ_and_betti_3d_is_appended():
    mask = np.zeros((3, 9, 9), dtype=np.uint8)
    mask[:, 2:7, 2:7] = CANONICAL_ID["liver"]  # not listed: counts as background
    mask[1, 4, 4] = CANONICAL_ID["pancreas"]
    cfg = ConditionConfig(structure_organs=("background", "pancreas"), betti_3d=True)
    classes = structure_classes(mask, cfg)
    assert set(np.unique(classes)) == {0, 1}
    vec = structure_condition(mask, cfg)
    want = np.concatenate([lad_structure_vector_gudhi(classes, (0, 1)), betti_3d_gudhi(classes, (1,))[0]])
    np.testing.assert_array_equal(vec, want)
    assert vec.shape == (structure_dim(3, cfg),) == (3 * 2 * 2 + 3,)
    # background has one hole (the pancreas voxel) on slice 1 only
    assert vec[:12].reshape(3, 2, 2)[:, 0, 1].tolist() == [0, 1, 0]


def test_structure_condition_rejects_bad_masks_and_configs():
    with pytest.raises(InputError, match="outside 0..11"):
        structure_condition(np.full((1, 2, 2), 40, dtype=np.uint8), ConditionConfig())
    with pytest.raises(InputError, match="integer ids"):
        structure_condition(np.zeros((1, 2, 2), dtype=np.float32), ConditionConfig())
    with pytest.raises(ConfigError, match="not canonical organs"):
        structure_condition(np.zeros((1, 2, 2), dtype=np.uint8), ConditionConfig(structure_organs=("lung",)))


def test_normalize_structure_is_log1p_and_rejects_negatives():
    out = normalize_structure(np.array([[0, 1, 3]], dtype=np.int64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, np.log(2.0), np.log(4.0)]], dtype=torch.float32))
    with pytest.raises(InputError, match="negative counts"):
        normalize_structure(torch.tensor([1, -1]))
