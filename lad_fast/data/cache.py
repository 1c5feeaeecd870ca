"""The embedded default dataset: procedural phantoms, generated and prepared once into a local cache.

Nothing is downloaded. The cache lives in ``$LAD_FAST_CACHE`` (default ``~/.cache/lad-fast``), one folder
per (preset, number of phantoms, seed); a second call finds it complete and returns at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lad_fast.config import LadConfig, get_preset
from lad_fast.errors import FolderInUseError
from lad_fast.utils.lock import LOCK_NAME

WAIT_S = 900.0  # preparing the lad preset's 16 phantoms takes a few minutes on two cores

DEFAULT_PHANTOMS = {"tiny": 32, "lad": 16}


def cache_root() -> Path:
    return Path(os.environ.get("LAD_FAST_CACHE", Path.home() / ".cache" / "lad-fast")).expanduser()


def phantom_dataset(preset: str, n: int | None = None, seed: int = 0) -> Path:
    """Path of a prepared dataset of ``n`` phantoms at ``preset``, generating it if needed."""
    from lad_fast.data.phantom.draw import write_phantoms

    cfg = get_preset(preset)
    n = n or DEFAULT_PHANTOMS.get(preset, 16)
    root = cache_root() / f"phantoms-{preset}-n{n}-s{seed}"
    prepared = root / "prepared"
    index = prepared / "index.json"
    if _complete(index, n):
        return prepared
    write_phantoms(root / "raw", n=n, cfg=cfg.phantom, seed=seed)
    _prepare_or_wait(root / "raw", prepared, cfg, n)
    return prepared


def _prepare_or_wait(raw: Path, prepared: Path, cfg: LadConfig, n: int, timeout_s: float = WAIT_S) -> None:
    """Prepare ``raw`` into ``prepared``. While another process (a second job started at the same time)
    holds the folder's lock, wait for it instead of refusing: its result is the same dataset. A lock left
    by a process that died is taken over by the retry (lad_fast.utils.lock)."""
    from lad_fast.data.prepare import prepare_dataset

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            prepare_dataset(raw, prepared, cfg)
            return
        except FolderInUseError:
            if time.monotonic() > deadline:
                raise FolderInUseError(
                    f"{prepared}: another lad-fast process has been preparing this phantom cache for over "
                    f"{timeout_s:.0f} s; run again once it has ended (the lock file {prepared / LOCK_NAME} "
                    "names it)"
                ) from None
            time.sleep(0.5)
            if _complete(prepared / "index.json", n):
                return


def _complete(index: Path, n: int) -> bool:
    try:
        return len(json.loads(index.read_text()).get("cases", [])) == n
    except (OSError, ValueError):
        return False
