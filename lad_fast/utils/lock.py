"""One writer per folder: a lock file in ``generate --out``, a training run folder and a prepared dataset.

``<folder>/.lad-fast.lock`` holds ``{"pid", "host", "command", "started", "token"}``; it is created with
``O_EXCL`` (atomic on local and NFSv3+ file systems), so of two processes starting together exactly one
gets it and the other is refused with :class:`FolderInUseError`. A lock left by a process that died
(same host, pid no longer running) is taken over with a warning; a lock of another host cannot be
checked and is refused, naming the file to delete once that process is known to be gone.

Under ``torchrun`` rank 0 takes the lock for the whole job (the other ranks write only what rank 0's
job owns: their manifest shards), so ranks never refuse each other. :func:`locks_folder` wraps a
function whose argument names the folder; a folder the call created and left empty (a refusal before
anything was written) is removed again, with the empty folders made inside it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lad_fast.errors import FolderInUseError

LOCK_NAME = ".lad-fast.lock"
_UNWRITTEN_GRACE_S = 10.0  # a lock file still empty this long after creation: its writer died
F = TypeVar("F", bound=Callable[..., Any])


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was taken over."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s chain that does not exist yet (None: it exists)."""
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _remove_empty(top: Path, folder: Path) -> None:
    """Remove ``folder``'s empty sub-folders and ``folder`` .. ``top`` while empty (rmdir only: a folder
    holding any file stays)."""
    if not folder.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    p = folder
    while p != top and p != p.parent:
        p = p.parent
        with contextlib.suppress(OSError):
            os.rmdir(p)


class FolderLock:
    """The lock of ``folder`` for ``command`` ("generate", "train vqgan" ...); a context manager."""

    def __init__(self, folder: str | os.PathLike[str], command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.token = uuid.uuid4().hex
        self.created: Path | None = None

    def _describe(self, holder: dict[str, Any] | None) -> str:
        if holder is None:
            return "a lad-fast process that is starting"
        return (
            f"`lad-fast {holder.get('command', '?')}` (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('started', '?')})"
        )

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # created but not written yet, or written by a process killed in between
            try:
                return time.time() - self.path.stat().st_mtime > _UNWRITTEN_GRACE_S
            except FileNotFoundError:
                return False
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
            return False  # another machine's process cannot be checked from here
        return not _alive(pid)

    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            return  # the caller refuses a file in the folder's place with its own message
        self.created = _first_missing(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": self.token,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = _read(self.path)
                if not self._stale(holder):
                    self._give_up()
                    raise FolderInUseError(
                        f"{self.folder} is in use by {self._describe(holder)}; wait for it to finish or "
                        f"choose another folder (if that process is gone, delete {self.path})"
                    ) from None
                # Move the stale lock aside under a unique name: of two processes taking it over at
                # once, only one rename succeeds, and the other then meets the new holder's lock.
                aside = self.path.with_name(f"{LOCK_NAME}.{self.token}.stale")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                warnings.warn(
                    f"{self.folder}: took over the lock of {self._describe(holder)}, which is no longer "
                    "running (killed?); its unfinished work is checked as usual",
                    StaleLockWarning,
                    stacklevel=3,
                )
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return
        self._give_up()
        raise FolderInUseError(
            f"{self.folder}: its lock {self.path} keeps changing; is another lad-fast starting? Retry"
        )

    def _give_up(self) -> None:
        if self.created is not None:
            _remove_empty(self.created, self.folder)

    def release(self, failed: bool = False) -> None:
        """Remove the lock (if still ours); after a failure, also the folders this call created and left
        empty."""
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if failed:
            self._give_up()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.release(failed=exc_type is not None)


def locks_folder(argument: str, command: str) -> Callable[[F], F]:
    """Decorate a function so that, on rank 0, it runs holding the :class:`FolderLock` of the folder
    passed as its parameter ``argument``."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            from lad_fast.utils.distributed import env_rank

            if env_rank() != 0:
                return fn(*args, **kwargs)
            folder = signature.bind(*args, **kwargs).arguments[argument]
            with FolderLock(folder, command):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], command: str) -> Iterator[FolderLock]:
    """``with folder_lock(out, "generate"):`` on rank 0; a no-op on the other ranks."""
    from lad_fast.utils.distributed import env_rank

    if env_rank() != 0:
        yield FolderLock(folder, command)
        return
    with FolderLock(folder, command) as lock:
        yield lock
