"""Atomic writes: a reader never sees a half-written file or folder.

Files are written to a temporary sibling, fsynced and renamed over the target (``os.replace`` is atomic
on POSIX within one file system). Folders are assembled under a temporary sibling name and renamed into
place as a whole.

A failed write raises an ``OSError`` that names the target, never the hidden temporary: a
:class:`~lad_fast.errors.DiskFullError` for a full disk (numpy's errno-less short write included), else
the original error (read-only file system, permission denied, ...) with the target as its file name, which
the command line prints as one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lad_fast.errors import DiskFullError

# What atomic_path and atomic_dir name their temporaries: "." + target name + "." + mkstemp/mkdtemp's
# 8 random characters + ".tmp" (or ".old") + the kept suffix, e.g. ".lad_000001.nii.gz.k2j4_x9a.tmp.nii.gz".
_TEMPORARY_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.(?:tmp|old)(?:\.[A-Za-z0-9.]+)?$")


def temporary_target(name: str) -> str | None:
    """The target name of an atomic writer's temporary file or folder ``name``; None when ``name`` is not
    one (so a caller removes leftovers of its own writes only, never a user's dot-file)."""
    m = _TEMPORARY_RE.match(name)
    return m.group("target") if m else None


def remove_temporaries(folder: str | os.PathLike[str], owned: Callable[[str], bool]) -> list[Path]:
    """Remove the temporaries a killed writer left in ``folder`` whose target name ``owned`` accepts;
    returns what was removed. Call it only while holding the folder (its lock, or rank 0 alone)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        target = temporary_target(p.name)
        if target is not None and owned(target):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set back at once
    os.umask(mask)
    return mask


def _default_mode() -> int:
    """0o666 minus the process umask: what ``open(..., "w")`` would have given (mkstemp gives 0o600)."""
    return 0o666 & ~_umask()


def _dir_mode() -> int:
    """0o777 minus the process umask: what ``os.mkdir`` would have given (mkdtemp gives 0o700, which a
    lab's shared group cannot read)."""
    return 0o777 & ~_umask()


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (writers such as safetensors create
    files 0o600, which a lab's shared group cannot read)."""
    os.chmod(path, _dir_mode() if Path(path).is_dir() else _default_mode())


def _free(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
            if free < 1024 or unit == "TiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown"


# numpy's ``np.save``/``tofile`` on a full disk: a short ``fwrite`` reported as a plain OSError, no errno.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def write_failure(target: str | os.PathLike[str], err: BaseException) -> DiskFullError | None:
    """A one-line :class:`DiskFullError` (an ``OSError`` with errno ENOSPC) naming ``target`` and the free
    space when ``err`` is a full disk (``OSError`` ENOSPC or EDQUOT, numpy's short-write error ``"65536
    requested and 8064 written"``, which carries no errno, a DiskFullError about a file inside ``target``,
    or the messages torch's and safetensors' writers turn it into); None otherwise."""
    text = str(err)
    full = (
        (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))
        or (isinstance(err, OSError) and err.errno is None and bool(_SHORT_WRITE.match(text)))
        or any(s in text for s in ("No space left", "os error 28", "unexpected pos", "file write failed"))
    )
    if not full:
        return None
    return DiskFullError(
        f"{target}: no space left on the device while writing it ({_free(Path(target))} free there); "
        "free some space and rerun the same command (what was complete is kept, nothing half-written)"
    )


def _about_target(target: Path, err: OSError, temporary: Path) -> OSError:
    """``err`` naming ``target`` instead of the hidden ``temporary`` (or a file inside it) it was raised
    for, so the one line the CLI prints names the file the user asked for; other errors unchanged."""
    name = err.filename
    if name is not None and not (
        Path(os.fsdecode(name)) == temporary or temporary in Path(os.fsdecode(name)).parents
    ):
        return err
    if name is None and err.errno is None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(target))  # keeps the errno's subclass


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse directory fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto ``target``.

    ``suffix`` keeps an extension that writers look at (``.nii.gz`` for nibabel, say). On error the
    temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as err:  # a read-only or unwritable folder: name the file, not the temporary
        raise _failure(target, err, target.parent) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as err:
        failure = _failure(target, err, tmp)
        if failure is err:
            raise
        raise failure from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _failure(target: Path, err: OSError, temporary: Path) -> OSError:
    """What a failed atomic write of ``target`` raises: a DiskFullError for a full disk, else ``err``
    naming ``target`` when it was raised for the ``temporary`` (:func:`_about_target`)."""
    full = write_failure(target, err)
    if full is not None:
        return full
    return _about_target(target, err, temporary)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target`` whole.

    Files written into the folder should be fsynced by their writers (``atomic_path`` does). An old
    ``target`` is renamed aside before the new folder takes its name and removed only afterwards, so an
    interruption leaves either the old or the new folder complete on disk (the old one, possibly under
    its ``.<name>.*.old`` sibling name, for the instant between the two renames). POSIX cannot swap two
    folders in one rename; callers that need a name that always resolves (checkpoints) write new
    folders under new names and switch a pointer file instead.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise _failure(target, err, target.parent) from err
    old: Path | None = None
    try:
        yield tmp
        _fsync_dir(tmp)
        os.chmod(tmp, _dir_mode())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)  # an empty folder is replaced by a rename
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as err:  # a full disk names the folder, not a file in its hidden temporary
        failure = _failure(target, err, tmp)
        if failure is err:
            raise
        raise failure from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the second rename failed: put the old folder back
                os.replace(old, target)


def append_line(target: str | os.PathLike[str], line: str) -> None:
    """Append one line and fsync it (used for ``log.jsonl`` and ``manifest.jsonl``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        full = write_failure(target, err)
        if full is None:
            raise
        raise full from err
