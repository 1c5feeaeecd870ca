"""Names read from files (case ids in ``index.json``, manifest ids, discovered source names) checked
before they become paths: each must be one plain path component, resolved inside its folder.

A name that is empty, ``.``, ``..`` or holds a path separator would put files outside their folder
(``cases/../../victim``) or onto the folder itself (``cases/`` for an empty id); :func:`plain_name`
refuses it, and :func:`inside` refuses a path that resolves (through symbolic links too) outside its
root.
"""

from __future__ import annotations

import os
from pathlib import Path

from lad_fast.errors import InputError

_SEPARATORS = {"/", "\\", "\0"} | ({os.altsep} if os.altsep else set())


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is one ordinary path component: a non-empty string, not ``.`` or ``..``, and
    without ``/``, ``\\`` or NUL (a backslash is refused on every OS so a dataset means the same
    thing everywhere)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not (set(name) & _SEPARATORS)


def plain_name(name: object, what: str, source: str | os.PathLike[str], hint: str) -> str:
    """``name`` when it is one plain path component (:func:`is_plain_name`), else InputError
    ``"<source>: <what> <name!r> is not a plain file name ...; <hint>"``."""
    if not is_plain_name(name):
        raise InputError(
            f"{source}: {what} {name!r} is not a plain file name (it is empty, '.' or '..', or holds a path "
            f"separator), so it cannot name a file inside the folder; {hint}"
        )
    return name  # type: ignore[return-value]


def inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts...``, checked to resolve inside ``root`` (symbolic links followed); InputError
    otherwise."""
    root = Path(root)
    path = root.joinpath(*parts)
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise InputError(
            f"{path}: resolves to {path.resolve()}, outside {root}; lad-fast reads and writes only inside "
            "its own folders (remove the link or re-create the folder)"
        ) from None
    return path
