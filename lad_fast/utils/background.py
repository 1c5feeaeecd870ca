"""One worker thread behind a bounded queue: work on item k runs while the main thread makes item k+1.

The generator uses it to decode, convert and write batch k while batch k+1 is sampled (on a GPU the
denoiser then never waits for gzip; on a CPU the writer takes the core the thread policy leaves free,
see :mod:`lad_fast.utils.threads`). ``maxsize`` bounds how many items wait, so memory stays bounded when
writing is slower than sampling: :meth:`submit` blocks until there is room.

Errors: the first exception raised by ``fn`` (any ``BaseException``: a ``KeyboardInterrupt`` raised
inside ``fn`` too) stops the worker; items still queued are dropped, never half-done; the next
:meth:`submit` or :meth:`close` in the main thread raises that same exception object, so its type and
message are the original's. When the main thread itself fails (an interrupt, say), leaving the ``with``
block lets the item in progress finish (writes are atomic, so a volume is complete or absent), drops
the rest and re-raises the main thread's exception.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class Background:
    """``with Background(fn, maxsize) as bg: bg.submit(item) ...``: ``fn(item)`` on one daemon thread."""

    def __init__(self, fn: Callable[[Any], None], maxsize: int = 1, name: str = "lad-fast-writer") -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self._fn = fn
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._error: BaseException | None = None
        self._raised = False
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None and not self._abort.is_set():
                    self._fn(item)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread as it is
                self._error = err
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True  # once; the worker keeps skipping items
            raise self._error

    def submit(self, item: Any) -> None:
        """Queue ``item`` (blocks while the queue is full); raises the worker's error, if any, first."""
        self._raise()
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise()  # the worker died with a full queue: do not wait forever

    @property
    def cancelled(self) -> bool:
        """True once :meth:`abort` was called: ``fn`` may check it to stop early within a long item."""
        return self._abort.is_set()

    def close(self) -> None:
        """Finish every queued item, stop the thread, raise the worker's error, if any."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Let the item in progress finish, drop the queued ones, stop the thread."""
        self._abort.set()
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # the main thread's exception propagates; a worker error is secondary
