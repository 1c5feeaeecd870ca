"""The canonical organ list: the label ids every prepared dataset, checkpoint and generated mask stores.

It sits below every other module (conditions, models, losses and the data package all need it), so
that needing the ids never means importing the data pipeline. Input vocabularies and their mapping
onto these ids live in :mod:`lad_fast.data.labels`.
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
