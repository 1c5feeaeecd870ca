"""Mask, topology and intensity fidelity of generated volumes (issue 10, item 1).

A generated volume comes with the mask that conditioned it. A segmenter (the project's own, or one whose
masks the user imports) labels the volume; comparing that segmentation with the conditioning mask says
whether the anatomy asked for is the anatomy drawn:

* **Dice** per organ, ``2 |P & R| / (|P| + |R|)``, averaged over the volumes whose reference holds the
  organ (an organ the reference lacks is not scored: nothing was asked for);
* **organ volume error** per organ, ``|V_P - V_R| / V_R`` on the same volumes;
* **structure error**: mean absolute difference between the Lad structure vectors
  (:func:`lad_fast.conditioning.conditions.structure_condition`, per-slice Betti numbers) of segmentation
  and reference.

The same :func:`mask_fidelity` scores the two references a reader needs: the **shuffled baseline** (each
segmentation against the mask of another synthetic volume, :func:`derangement`: what a generator that
ignores its condition scores) and the **real ceiling** (the segmenter on real held-out cases against their
labels: what the segmenter itself can reach).

Intensity realism (:func:`hu_statistics`): per-organ median and inter-quartile range of HU, as MAISI
checks generated organs' median HU against training statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lad_fast.config import ConditionConfig
from lad_fast.data.labels import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.errors import InputError

# Below this mean Dice on real labelled volumes the segmenter disagrees with real labels as often as it
# agrees, so the Dice of synthetic volumes measures the segmenter more than the generator (a shuffled
# mask scores about 0.4 on the tiny phantoms; a trained segmenter's ceiling is about 0.9).
CEILING_MIN_DICE = 0.5


def ceiling_warning(real: dict[str, Any], minimum: float = CEILING_MIN_DICE) -> str | None:
    """The one line naming a segmenter too weak to score masks: its real ceiling ``real`` (a
    :func:`mask_fidelity` block on real labelled volumes) has a mean Dice under ``minimum``; else None."""
    dice = real.get("mean_dice")
    if dice is None or dice >= minimum:
        return None
    return (
        f"the segmenter's real ceiling (mean Dice {dice:.3f} on {real.get('cases', '?')} real labelled "
        f"volume(s)) is under {minimum}: it is too weak to score masks, so the Dice of the synthetic "
        "volumes says little; retrain it with more steps (`lad-fast train segmenter --run RUN --steps N "
        "--force`) or pass an external segmenter's masks (--segmentations)"
    )


def present_organs(*mask_sets: np.ndarray | None) -> list[str]:
    """Canonical foreground organs present in any mask of the (N, D, H, W) sets, in canonical order."""
    seen = np.zeros(NUM_CLASSES, dtype=bool)
    for masks in mask_sets:
        if masks is not None and np.size(masks):
            seen |= np.bincount(np.asarray(masks).ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES] > 0
    return [CANONICAL_ORGANS[k] for k in range(1, NUM_CLASSES) if seen[k]]


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels per class of ``pred``, of ``ref`` and of their agreement, each (NUM_CLASSES,)."""
    p, r = np.asarray(pred).ravel(), np.asarray(ref).ravel()
    inter = np.bincount(r[p == r], minlength=NUM_CLASSES)
    return np.bincount(p, minlength=NUM_CLASSES), np.bincount(r, minlength=NUM_CLASSES), inter


def case_fidelity(pred: np.ndarray, ref: np.ndarray, cond: ConditionConfig) -> dict[str, Any]:
    """Scores of one segmentation ``pred`` against its reference ``ref``, both (D, H, W) canonical ids.

    Returns ``{"dice": {organ: float}, "volume_error": {organ: float}, "structure_l1": float}``; the organ
    dicts hold only the organs present in ``ref``.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"segmentation {pred.shape} and reference {ref.shape} differ in shape")
    from lad_fast.conditioning.conditions import structure_condition

    cp, cr, inter = _counts(pred, ref)
    dice, vol = {}, {}
    for k in range(1, NUM_CLASSES):
        if cr[k] == 0:
            continue
        dice[CANONICAL_ORGANS[k]] = float(2 * inter[k] / (cp[k] + cr[k]))
        vol[CANONICAL_ORGANS[k]] = float(abs(int(cp[k]) - int(cr[k])) / cr[k])
    s_pred = structure_condition(pred.astype(np.uint8), cond)
    s_ref = structure_condition(ref.astype(np.uint8), cond)
    return {"dice": dice, "volume_error": vol, "structure_l1": float(np.abs(s_pred - s_ref).mean())}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def mask_fidelity(
    preds: np.ndarray, refs: np.ndarray, cond: ConditionConfig, organs: Sequence[str] | None = None
) -> dict[str, Any]:
    """Mean scores of segmentations ``preds`` against references ``refs``, both (N, D, H, W) canonical ids.

    Returns ``{"dice": {organ: mean or None}, "volume_error": {...}, "mean_dice", "mean_volume_error",
    "structure_l1", "cases": N}``. ``organs`` fixes the organ keys (default: those present in ``refs``);
    an organ no reference holds maps to None. The means over organs weigh every organ alike.
    """
    if len(preds) != len(refs):
        raise InputError(f"{len(preds)} segmentations but {len(refs)} references")
    from lad_fast.utils.progress import track

    pairs = zip(preds, refs, strict=True)
    per = [case_fidelity(p, r, cond) for p, r in track(pairs, "mask fidelity", total=len(preds))]
    organs = list(organs) if organs is not None else present_organs(refs)
    dice = {o: _mean([c["dice"][o] for c in per if o in c["dice"]]) for o in organs}
    vol = {o: _mean([c["volume_error"][o] for c in per if o in c["volume_error"]]) for o in organs}
    return {
        "dice": dice,
        "volume_error": vol,
        "mean_dice": _mean([v for v in dice.values() if v is not None]),
        "mean_volume_error": _mean([v for v in vol.values() if v is not None]),
        "structure_l1": _mean([c["structure_l1"] for c in per]),
        "cases": len(per),
    }


def derangement(groups: Sequence[str]) -> np.ndarray:
    """A fixed permutation ``perm`` with ``perm[i] != i`` for the shuffled baseline: volume i is scored
    against the mask of volume ``perm[i]``.

    ``groups`` names each volume's source (its source case): volumes made from one source mask share
    anatomy, so a fair shuffle pairs different sources. In source order, each volume is paired with the one
    ``m`` places further on (cyclically), ``m`` the size of the largest group: that pairs different sources
    whenever no source holds more than half of the volumes (else ``m`` = 1: any other volume). Needs N >= 2.
    """
    n = len(groups)
    if n < 2:
        raise InputError("the shuffled baseline needs at least 2 synthetic volumes")
    order = sorted(range(n), key=lambda i: (groups[i], i))
    largest = max(sum(1 for g in groups if g == name) for name in set(groups))
    shift = largest if 2 * largest <= n else 1
    perm = np.empty(n, dtype=np.int64)
    for pos, i in enumerate(order):
        perm[i] = order[(pos + shift) % n]
    return perm


def hu_statistics(hu: np.ndarray, masks: np.ndarray, organs: Sequence[str]) -> dict[str, Any]:
    """Per-organ HU statistics pooled over volumes: ``{organ: {"median", "q25", "q75", "iqr", "voxels"}}``.

    hu (N, D, H, W) float HU; masks (N, D, H, W) canonical ids. An organ without voxels maps to None.
    """
    out: dict[str, Any] = {}
    for organ in organs:
        values = np.asarray(hu)[np.asarray(masks) == CANONICAL_ORGANS.index(organ)]
        if values.size == 0:
            out[organ] = None
            continue
        q25, med, q75 = (float(v) for v in np.percentile(values, [25, 50, 75]))
        out[organ] = {
            "median": round(med, 1),
            "q25": round(q25, 1),
            "q75": round(q75, 1),
            "iqr": round(q75 - q25, 1),
            "voxels": int(values.size),
        }
    return out


def hu_histograms(
    hu: np.ndarray, masks: np.ndarray, organs: Sequence[str], span: tuple[float, float], bins: int = 60
) -> dict[str, Any]:
    """Per-organ HU densities over ``bins`` equal bins of ``span`` = (lo, hi) HU, values outside counted in
    the end bins: ``{"edges": [...], organ: [...]}`` (each histogram sums to 1; None without voxels)."""
    edges = np.linspace(span[0], span[1], bins + 1)
    out: dict[str, Any] = {"edges": [round(float(e), 2) for e in edges]}
    for organ in organs:
        values = np.asarray(hu)[np.asarray(masks) == CANONICAL_ORGANS.index(organ)]
        if values.size == 0:
            out[organ] = None
            continue
        h, _ = np.histogram(np.clip(values, span[0], span[1]), bins=edges)
        out[organ] = [round(float(v), 5) for v in h / h.sum()]
    return out
