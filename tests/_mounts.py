"""Real file systems for hostile-output tests: a read-only one and a nearly full one (tmpfs mounts).

Mounting needs root and the right to mount (a container may refuse it): without it the calling test
skips, and the tests that monkeypatch the same errno still run.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False, fill=None) -> Iterator[Path]:
    """``path`` as a tmpfs of ``size``; ``fill(path)`` runs while it is writable, then ``read_only``
    remounts it read-only. Skips the calling test when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here (needs root and the right to mount)")
    try:
        if fill is not None:
            fill(path)
        if read_only and not _mount("-o", "remount,ro", str(path)):
            pytest.skip("cannot remount a tmpfs read-only here")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)
