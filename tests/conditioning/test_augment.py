"""lad_fast.conditioning.augment: sides kept, volumes in range, one seed one result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lad_fast.conditioning.augment import MIN_CHECKED_VOXELS, augment_many, augment_mask
from lad_fast.config import AugmentConfig
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.errors import ConfigError, InputError

SPACING = (4.6, 6.4, 6.4)


def _phantom() -> np.ndarray:
    """A tiny-geometry (16, 64, 64) abdomen: W grows toward the patient's right."""
    d, h, w = np.indices((16, 64, 64)).astype(float)
    mask = np.zeros((16, 64, 64), dtype=np.uint8)

    def blob(cd, ch, cw, rd, rh, rw, organ):
        mask[((d - cd) / rd) ** 2 + ((h - ch) / rh) ** 2 + ((w - cw) / rw) ** 2 <= 1] = CANONICAL_ID[organ]

    blob(9, 34, 44, 5, 12, 11, "liver")  # patient's right
    blob(10, 30, 16, 3, 6, 5, "spleen")  # left
    blob(6, 20, 42, 3, 4, 3, "kidney_right")
    blob(6, 20, 21, 3, 4, 3, "kidney_left")
    blob(7, 36, 30, 2, 3, 7, "pancreas")
    blob(7, 36, 30, 1, 2, 2, "pancreatic_lesion")
    return mask


def _centre_w(mask: np.ndarray, organ: str) -> float:
    return float(np.nonzero(mask == CANONICAL_ID[organ])[2].mean())


def test_organs_keep_their_side_and_volumes_stay_in_range():
    src = _phantom()
    cfg = AugmentConfig(morph_prob=0.5)
    counts = np.bincount(src.ravel(), minlength=12)
    for out, record in augment_many(src, SPACING, cfg, seed=7, n=6):
        assert out.shape == src.shape and out.dtype == src.dtype
        assert _centre_w(out, "kidney_right") > _centre_w(out, "kidney_left")
        assert _centre_w(out, "liver") > _centre_w(out, "spleen")
        new = np.bincount(out.ravel(), minlength=12)
        for k in np.flatnonzero(counts[1:] >= MIN_CHECKED_VOXELS) + 1:
            assert cfg.volume_range[0] <= new[k] / counts[k] <= cfg.volume_range[1]
        json.dumps(record)  # the record is JSON-able
        assert not np.array_equal(out, src)


def test_one_seed_one_result_whatever_n():
    src = _phantom()
    cfg = AugmentConfig(remove_prob=0.2)
    few = augment_many(src, SPACING, cfg, seed=3, n=2)
    many = augment_many(src, SPACING, cfg, seed=3, n=3)
    for (a, ra), (b, rb) in zip(few, many[:2], strict=True):
        assert np.array_equal(a, b) and ra == rb
    assert not np.array_equal(many[0][0], many[1][0])
    other = augment_many(src, SPACING, cfg, seed=4, n=1)
    assert not np.array_equal(other[0][0], few[0][0])


def test_identity_draw_returns_the_source():
    src = _phantom()
    cfg = AugmentConfig(rotate_deg=0.0, scale=(1.0, 1.0), translate_mm=0.0, elastic_mm=0.0, morph_prob=0.0)
    out, record = augment_mask(src, SPACING, cfg, np.random.default_rng(0))
    assert np.array_equal(out, src) and record["draws"] == 1


def test_removed_lesion_goes_back_to_the_pancreas():
    src = _phantom()
    cfg = AugmentConfig(
        rotate_deg=0.0, scale=(1.0, 1.0), translate_mm=0.0, elastic_mm=0.0, morph_prob=0.0, remove_prob=1.0
    )
    out, record = augment_mask(src, SPACING, cfg, np.random.default_rng(0))
    assert not out.any()  # every organ removed ...
    assert "pancreatic_lesion" in record["removed"]
    lesion_only = np.where(src == CANONICAL_ID["pancreatic_lesion"], src, 0).astype(np.uint8)
    lesion_only[src == CANONICAL_ID["pancreas"]] = CANONICAL_ID["pancreas"]
    out, _ = augment_mask(lesion_only, SPACING, cfg, np.random.default_rng(0))
    assert not out.any()  # ... and a lesion alone goes to the pancreas, which is then removed too


def test_bad_inputs_and_impossible_ranges_are_reported():
    src = _phantom()
    with pytest.raises(InputError, match="integer mask"):
        augment_mask(src.astype(np.float32), SPACING, AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(InputError, match="spacing must be three positive"):
        augment_mask(src, (1.0, 0.0, 1.0), AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(InputError, match="negative labels"):
        augment_mask(src.astype(np.int16) - 1, SPACING, AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="0 < low <= 1 <= high"):
        augment_mask(src, SPACING, AugmentConfig(volume_range=(1.2, 1.5)), np.random.default_rng(0))
    tight = AugmentConfig(scale=(1.3, 1.3), volume_range=(0.99, 1.01))
    with pytest.raises(ConfigError, match="within volume_range"):
        augment_mask(src, SPACING, tight, np.random.default_rng(0))
