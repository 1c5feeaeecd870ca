"""The embedded default dataset: procedural phantoms, generated and prepared once into a local cache.

Nothing is downloaded. The cache lives in ``$LAD_FAST_CACHE`` (default ``~/.cache/lad-fast``), one folder
per (preset, number of phantoms, seed); a second call finds it complete and returns at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lad_fast.config import get_preset

DEFAULT_PHANTOMS = {"tiny": 32, "lad": 16}


def cache_root() -> Path:
    return Path(os.environ.get("LAD_FAST_CACHE", Path.home() / ".cache" / "lad-fast")).expanduser()


def phantom_dataset(preset: str, n: int | None = None, seed: int = 0) -> Path:
    """Path of a prepared dataset of ``n`` phantoms at ``preset``, generating it if needed."""
    from lad_fast.data.phantom import write_phantoms
    from lad_fast.data.prepared import prepare_dataset

    cfg = get_preset(preset)
    n = n or DEFAULT_PHANTOMS.get(preset, 16)
    root = cache_root() / f"phantoms-{preset}-n{n}-s{seed}"
    prepared = root / "prepared"
    index = prepared / "index.json"
    if index.is_file() and len(json.loads(index.read_text()).get("cases", [])) == n:
        return prepared
    write_phantoms(root / "raw", n=n, cfg=cfg.phantom, seed=seed)
    prepare_dataset(root / "raw", prepared, cfg)
    return prepared
