"""The SSL benchmark's statistics and draws (lad_fast.ssl.stats) against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from lad_fast.errors import ConfigError
from lad_fast.ssl.stats import draw_cases, paired_bootstrap, recovered_fraction

POOL = [f"case{i:02d}" for i in range(20)]


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    # differences (0, 1): resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 and
    # 97.5 percentiles are 0 and 1
    iv = paired_bootstrap([1.0, 3.0], [1.0, 2.0], n_boot=20_000)
    assert iv.diff == pytest.approx(0.5) and iv.lo == pytest.approx(0.0) and iv.hi == pytest.approx(1.0)
    assert not iv.excludes_zero and iv.seeds == 2
    # 80 % interval of the same: the 10th and 90th percentiles are still 0 and 1
    assert paired_bootstrap([1.0, 3.0], [1.0, 2.0], level=0.8).lo == pytest.approx(0.0)


def test_bootstrap_is_paired_not_two_sample():
    # each arm varies a lot across seeds, but the arm beats the reference by 0.1 on every seed
    ref = [0.1, 0.9, 0.3, 0.7, 0.5]
    arm = [r + 0.1 for r in ref]
    iv = paired_bootstrap(arm, ref)
    assert iv.diff == pytest.approx(0.1) and iv.lo == pytest.approx(0.1) and iv.hi == pytest.approx(0.1)
    assert iv.excludes_zero and iv.as_dict()["excludes_zero"] is True


def test_bootstrap_interval_brackets_the_mean_and_is_deterministic():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.5, 0.1, 7), rng.normal(0.45, 0.1, 7)
    iv = paired_bootstrap(a, b)
    d = a - b
    assert iv.diff == pytest.approx(d.mean()) and d.min() <= iv.lo < iv.diff < iv.hi <= d.max()
    assert paired_bootstrap(a, b) == iv  # same seed, same interval
    assert iv.excludes_zero == (iv.lo > 0 or iv.hi < 0)


def test_bootstrap_refuses_unpaired_lists():
    with pytest.raises(ConfigError, match=r"two equal, non-empty lists of seeds \(3 vs 2\)"):
        paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ConfigError, match="non-empty"):
        paired_bootstrap([], [])


def test_recovered_fraction():
    assert recovered_fraction(0.6, 0.5, 0.7) == pytest.approx(0.5)
    assert recovered_fraction(0.7, 0.5, 0.7) == pytest.approx(1.0)
    assert recovered_fraction(0.4, 0.5, 0.7) == pytest.approx(-0.5)  # the arm hurts
    assert recovered_fraction(0.6, 0.5, 0.5) is None  # no gain to recover
    assert recovered_fraction(0.6, 0.5, 0.45) is None  # the oracle loses: the ratio would mislead


def test_draws_are_deterministic_disjoint_and_differ_between_seeds():
    d0 = draw_cases(POOL, 0, unlabelled=4, extra=8)
    assert d0 == draw_cases(POOL, 0, unlabelled=4, extra=8)
    assert len(d0.real) == 4 and len(d0.extra) == 8 and not set(d0.real) & set(d0.extra)
    assert set(d0.real) | set(d0.extra) <= set(POOL)
    draws = [draw_cases(POOL, s, 4, 8).real for s in range(5)]
    assert len(set(draws)) == 5
    # the labelled cases are the first K of U: nested, so K = 1 is part of K = 2 is part of K = 4
    assert d0.labelled(1) == d0.real[:1] and d0.labelled(4) == d0.real
    assert set(d0.labelled(2)) <= set(d0.labelled(4))


def test_draws_refuse_what_does_not_fit():
    with pytest.raises(ConfigError, match="need 21 distinct cases, the pool has 20"):
        draw_cases(POOL, 0, unlabelled=5, extra=16)
    with pytest.raises(ConfigError, match="between 1 and U = 4"):
        draw_cases(POOL, 0, 4, 2).labelled(5)


def test_one_seed_has_no_interval_that_excludes_zero():
    iv = paired_bootstrap([0.5], [0.4])
    assert iv.diff == pytest.approx(0.1) and iv.lo == iv.hi and not iv.excludes_zero
    assert paired_bootstrap([0.5, 0.6], [0.4, 0.4]).excludes_zero  # two seeds, both above: it does
