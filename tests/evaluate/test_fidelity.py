"""Mask, topology and intensity fidelity (lad_fast.evaluate.fidelity)."""

from __future__ import annotations

import numpy as np
import pytest

from lad_fast.config import ConditionConfig
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.errors import InputError
from lad_fast.evaluate.fidelity import (
    case_fidelity,
    derangement,
    hu_histograms,
    hu_statistics,
    mask_fidelity,
    present_organs,
)

COND = ConditionConfig(structure_organs=("background", "pancreas", "liver"))
LIVER, PANCREAS, SPLEEN = CANONICAL_ID["liver"], CANONICAL_ID["pancreas"], CANONICAL_ID["spleen"]


def _mask() -> np.ndarray:
    m = np.zeros((4, 12, 12), dtype=np.uint8)
    m[:, 1:6, 1:6] = LIVER  # 4 * 25 = 100 voxels
    m[1:3, 8:10, 8:11] = PANCREAS  # 2 * 2 * 3 = 12 voxels
    return m


def test_a_perfect_segmentation_scores_one_and_no_error():
    m = _mask()
    s = case_fidelity(m, m, COND)
    assert s["dice"] == {"liver": 1.0, "pancreas": 1.0}
    assert s["volume_error"] == {"liver": 0.0, "pancreas": 0.0}
    assert s["structure_l1"] == 0.0


def test_dice_and_volume_error_follow_their_definitions():
    ref = _mask()
    pred = ref.copy()
    pred[:, 1:6, 5] = 0  # liver loses 4 * 5 = 20 voxels: |P| = 80, |P & R| = 80
    pred[0, 0, 0] = SPLEEN  # an organ the reference lacks is not scored
    s = case_fidelity(pred, ref, COND)
    assert s["dice"]["liver"] == pytest.approx(2 * 80 / (80 + 100))
    assert s["volume_error"]["liver"] == pytest.approx(20 / 100)
    assert s["dice"]["pancreas"] == 1.0 and "spleen" not in s["dice"]


def test_structure_error_counts_betti_differences_per_slice():
    ref = _mask()
    pred = ref.copy()
    pred[1, 8:10, 8:11] = 0  # one slice loses its pancreas component: b0 1 -> 0 there
    s = case_fidelity(pred, ref, COND)
    from lad_fast.conditioning.conditions import structure_dim

    # the pancreas' b0 drops by one on one slice; nothing else changes (the hole it leaves is background)
    assert s["structure_l1"] == pytest.approx(1 / structure_dim(4, COND))


def test_mask_fidelity_averages_over_cases_that_hold_the_organ():
    a = _mask()
    b = a.copy()
    b[b == PANCREAS] = 0  # case 2 has no pancreas in its reference
    pred_b = b.copy()
    pred_b[:, 1:6, 5] = 0
    out = mask_fidelity(np.stack([a, pred_b]), np.stack([a, b]), COND, organs=["liver", "pancreas", "spleen"])
    assert out["dice"]["liver"] == pytest.approx(round((1 + 160 / 180) / 2, 4))
    assert out["dice"]["pancreas"] == 1.0  # only case 1 asked for a pancreas
    assert out["dice"]["spleen"] is None
    assert out["mean_dice"] == pytest.approx(round((out["dice"]["liver"] + 1.0) / 2, 4))
    assert out["cases"] == 2


def test_mismatched_inputs_are_refused_by_message():
    m = _mask()
    with pytest.raises(InputError, match="differ in shape"):
        case_fidelity(m[:2], m, COND)
    with pytest.raises(InputError, match="2 segmentations but 1 references"):
        mask_fidelity(np.stack([m, m]), m[None], COND)


def test_present_organs_in_canonical_order():
    assert present_organs(_mask()[None], None) == ["liver", "pancreas"]


@pytest.mark.parametrize(
    "groups",
    [list("aabbcc"), list("abcabcab"), list("xy"), list("aaab")],
)
def test_derangement_moves_every_volume_and_prefers_another_source(groups):
    perm = derangement(groups)
    n = len(groups)
    assert sorted(perm.tolist()) == list(range(n))
    assert all(perm[i] != i for i in range(n))
    largest = max(groups.count(g) for g in set(groups))
    if 2 * largest <= n:
        assert all(groups[perm[i]] != groups[i] for i in range(n))
    assert np.array_equal(perm, derangement(groups))  # fixed: no randomness


def test_derangement_needs_two_volumes():
    with pytest.raises(InputError, match="at least 2 synthetic volumes"):
        derangement(["a"])


def test_hu_statistics_and_histograms():
    m = _mask()[None]
    hu = np.zeros(m.shape, dtype=np.float32)
    hu[m == LIVER] = np.linspace(0, 99, 100)  # median 49.5, quartiles 24.75 / 74.25
    hu[m == PANCREAS] = 40
    stats = hu_statistics(hu, m, ["liver", "pancreas", "spleen"])
    assert stats["liver"] == {"median": 49.5, "q25": 24.8, "q75": 74.2, "iqr": 49.5, "voxels": 100}
    assert stats["pancreas"]["iqr"] == 0.0 and stats["spleen"] is None
    hist = hu_histograms(hu, m, ["liver", "pancreas", "spleen"], (-100.0, 100.0), bins=4)
    assert hist["edges"] == [-100.0, -50.0, 0.0, 50.0, 100.0]
    assert hist["liver"] == [0.0, 0.0, 0.5, 0.5] and hist["pancreas"] == [0.0, 0.0, 1.0, 0.0]
    assert hist["spleen"] is None
