"""Label vocabularies and the one canonical organ list every prepared dataset uses.

Inputs arrive with TotalSegmentator v2 ids, AbdomenCT-1K ids, the Lad/UniSeg pancreas ids or a user JSON
map; :func:`to_canonical` maps all of them onto :data:`CANONICAL_ORGANS` at prepare time.
"""

from __future__ import annotations

# Canonical ids are the positions in this tuple. Order is a contract: prepared datasets, checkpoints
# and generated masks store these ids. Append only.
CANONICAL_ORGANS: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "pancreas",
    "pancreatic_lesion",
    "stomach",
    "gallbladder",
    "aorta",
    "inferior_vena_cava",
    "vertebrae",
)
CANONICAL_ID: dict[str, int] = {name: i for i, name in enumerate(CANONICAL_ORGANS)}
NUM_CLASSES = len(CANONICAL_ORGANS)

# TotalSegmentator v2 "total" task ids of the organs lad-fast keeps (everything else maps to background).
TOTALSEG_V2: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    52: "aorta",
    63: "inferior_vena_cava",
    # 25 sacrum, 26 vertebrae_S1, 27..50 vertebrae L5 .. C1
    **{i: "vertebrae" for i in range(25, 51)},
}

# AbdomenCT-1K: one "kidney" label for both sides; split by body side at prepare time.
ABDOMENCT1K: dict[int, str] = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}

# Lad / UniSeg pancreas task (the official Lad code's predicted masks).
LAD_PANCREAS: dict[int, str] = {1: "pancreas", 2: "pancreatic_lesion"}

VOCABULARIES: dict[str, dict[int, str]] = {
    "totalseg": TOTALSEG_V2,
    "abdomenct1k": ABDOMENCT1K,
    "lad": LAD_PANCREAS,
    "canonical": dict(enumerate(CANONICAL_ORGANS)),
}
