"""The SSL benchmark's protocol and statistics: per-seed draws shared by every arm, paired bootstrap
intervals over seeds, and the fraction of the oracle's gain an arm recovers.

Why paired: every arm of one seed sees the same real cases, labelled cases and fine-tuning seed, so the
per-seed difference between two arms removes what the draw itself contributes (which K cases were
labelled is by far the largest source of spread); the interval is over the seeds' differences, not
over two arms' separate means. The bootstrap is the percentile interval of the mean difference over
seeds resampled with replacement: with 5 to 10 seeds it is a little narrow (it is for the n seeds seen),
which the report states rather than hides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lad_fast.errors import ConfigError

DRAW_SALT = 0x55_4C  # draws from seed s never coincide with a training stream seeded with s


@dataclass(frozen=True)
class Draw:
    """One seed's cases: ``real`` the U real unlabelled volumes (the labelled K are its first K, so a
    larger K keeps the smaller K's cases), ``extra`` the N further real volumes only the oracle adds."""

    seed: int
    real: tuple[str, ...]
    extra: tuple[str, ...]

    def labelled(self, k: int) -> tuple[str, ...]:
        """The K labelled cases: the first ``k`` of the real pool (ConfigError when k > U)."""
        if not 1 <= k <= len(self.real):
            raise ConfigError(f"K = {k} labelled cases must be between 1 and U = {len(self.real)}")
        return self.real[:k]


def draw_cases(pool: Sequence[str], seed: int, unlabelled: int, extra: int) -> Draw:
    """Seed ``seed``'s draw of U = ``unlabelled`` real cases and N = ``extra`` oracle cases from ``pool``
    (disjoint, a pure function of the pool's order and the seed); ConfigError when U + N exceed it."""
    if unlabelled < 1 or extra < 0 or unlabelled + extra > len(pool):
        raise ConfigError(
            f"U = {unlabelled} real and N = {extra} oracle cases need {unlabelled + extra} distinct cases, "
            f"the pool has {len(pool)}; lower --unlabelled / --n-extra or give more data"
        )
    order = np.random.default_rng([DRAW_SALT, seed]).permutation(len(pool))
    ids = [pool[int(i)] for i in order]
    return Draw(seed, tuple(ids[:unlabelled]), tuple(ids[unlabelled : unlabelled + extra]))


@dataclass(frozen=True)
class Interval:
    """Mean paired difference over seeds and its bootstrap interval [lo, hi] at ``level``."""

    diff: float
    lo: float
    hi: float
    level: float
    seeds: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies on one side of zero; never for one seed, whose "interval" is the
        single difference itself (every resample is that seed), which says nothing of the spread."""
        return self.seeds >= 2 and (self.lo > 0 or self.hi < 0)

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"diff": round(self.diff, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4),
                "level": self.level, "seeds": self.seeds, "excludes_zero": self.excludes_zero}  # fmt: skip


def paired_bootstrap(
    arm: Sequence[float], reference: Sequence[float], n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of ``arm[i] - reference[i]`` over seeds i and its percentile bootstrap interval (seeds
    resampled with replacement ``n_boot`` times; deterministic for a given ``seed``).

    ConfigError when the two lists differ in length (they must be the same seeds) or are empty.
    """
    a, r = np.asarray(arm, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != r.shape or a.ndim != 1 or a.size == 0:
        raise ConfigError(
            f"paired bootstrap needs two equal, non-empty lists of seeds ({a.size} vs {r.size})"
        )
    d = a - r
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return Interval(float(d.mean()), float(lo), float(hi), level, int(d.size))


def recovered_fraction(arm: float, real: float, oracle: float, min_gap: float = 1e-3) -> float | None:
    """(arm - real) / (oracle - real): the share of what N more real volumes gain that the arm's N
    generated ones gain. None when the oracle gains less than ``min_gap`` over ``real`` (or loses): there
    is then no gain to recover, and the ratio would be noise."""
    gap = oracle - real
    if gap < min_gap:
        return None
    return (arm - real) / gap
