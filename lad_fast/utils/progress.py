"""Progress of long work: a rich bar on a terminal, plain lines in a log, nothing when asked.

Where progress goes, decided when :func:`make_progress` (or :func:`track`) starts:

* stderr is a terminal: a rich bar (counts, rate, ETA, the caller's status) drawn on stderr;
* stdout is not a terminal (``nohup``, SLURM, ``lad-fast train > log.txt``): one plain line on stdout
  every ``LAD_FAST_PROGRESS_INTERVAL`` seconds (default 30) while the work advances, and one when it
  ends, so a log file shows the job is alive::

      lad-fast vqgan 120/2000 (6%) 2.41 it/s ETA 13m00s elapsed 50s | rec 0.1234 lpips 0.08 3.2 vol/s

  The rate is measured over the last interval; the part after ``|`` is the caller's status (losses,
  throughput). Lines are written to the stdout the work started with, so a rich bar on a terminal
  stderr does not take them over;
* ``LAD_FAST_QUIET=1``: neither.

Both can be on at once (``lad-fast train > log.txt`` on a terminal: the bar on the screen, the lines in
the file). Callers use :func:`make_progress` like a rich ``Progress`` (``add_task``, ``update``,
``advance``) or :func:`track` over an iterable; they need not know where the progress goes.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TypeVar

from lad_fast.errors import ConfigError

T = TypeVar("T")

INTERVAL_ENV = "LAD_FAST_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def _quiet() -> bool:
    return os.environ.get("LAD_FAST_QUIET", "") not in ("", "0")


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a stream without isatty, or a closed one
        return False


def progress_enabled() -> bool:
    """Whether a progress bar is drawn (stderr is a terminal and LAD_FAST_QUIET is not set)."""
    return not _quiet() and _isatty(sys.stderr)


def lines_enabled() -> bool:
    """Whether plain progress lines are written (stdout is not a terminal and LAD_FAST_QUIET is not set)."""
    return not _quiet() and sys.stdout is not None and not _isatty(sys.stdout)


def line_interval() -> float:
    """Seconds between two plain progress lines: ``LAD_FAST_PROGRESS_INTERVAL`` or 30 (0: every update)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0; set it to, say, 30 or unset it"
        )
    return value


def _duration(seconds: float) -> str:
    """``7s``, ``12m05s``, ``3h02m``: short and fixed-format, for log lines."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


@dataclass
class _Mark:
    """Where a task stood at its last plain line (or when it was added)."""

    time: float
    completed: float
    started: float
    printed: bool = False
    ended: bool = False


def format_line(
    description: str,
    completed: float,
    total: float | None,
    rate: float | None,
    elapsed: float,
    status: str = "",
) -> str:
    """One plain progress line: counts, percentage, rate (``it/s``, or ``s/it`` below one per second),
    ETA from that rate, elapsed time, then the caller's status after ``|``."""
    parts = [f"lad-fast {description}", _count(completed) + (f"/{_count(total)}" if total else "")]
    if total:
        parts.append(f"({100 * completed / total:.0f}%)")
    if rate is not None and rate > 0:
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
        if total and completed < total:
            parts.append(f"ETA {_duration((total - completed) / rate)}")
    parts.append(f"elapsed {_duration(elapsed)}")
    line = " ".join(parts)
    status = status.strip()
    return f"{line} | {status}" if status else line


def _make_class():
    """The rich ``Progress`` subclass that also writes plain lines (built lazily: rich loads on use)."""
    from rich.progress import Progress

    class LoggedProgress(Progress):
        """A rich ``Progress`` that writes a plain line per task to ``stream`` every ``interval`` seconds
        of its clock while the task advances, and once when it ends (if it wrote any). ``stream`` None:
        a plain rich ``Progress``."""

        def __init__(self, *columns, stream: IO[str] | None, interval: float, **kwargs):
            super().__init__(*columns, **kwargs)
            self._stream, self._interval = stream, interval
            self._marks: dict[int, _Mark] = {}

        def add_task(self, description, start=True, total=100.0, completed=0, visible=True, **fields):
            task_id = super().add_task(description, start, total, completed, visible, **fields)
            now = self.get_time()
            self._marks[task_id] = _Mark(time=now, completed=completed, started=now)
            return task_id

        def update(self, task_id, **kwargs) -> None:
            super().update(task_id, **kwargs)
            # only a count moves a line: a status set just before the step's count would be late by one
            if kwargs.get("completed") is not None or kwargs.get("advance") is not None:
                self._maybe_line(task_id)

        def advance(self, task_id, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._maybe_line(task_id)

        def _maybe_line(self, task_id) -> None:
            if self._stream is None or task_id not in self._marks:
                return
            with self._lock:
                mark, task, now = self._marks[task_id], self._tasks[task_id], self.get_time()
                ended = task.total is not None and task.completed >= task.total
                due = now - mark.time >= self._interval and task.completed > mark.completed
                if mark.ended or not (due or (ended and mark.printed)):
                    return
                dt = now - mark.time
                rate = (task.completed - mark.completed) / dt if dt > 0 else None
                status = str(task.fields.get("status", ""))
                line = format_line(
                    str(task.description), task.completed, task.total, rate, now - mark.started, status
                )
                mark.time, mark.completed, mark.printed, mark.ended = now, task.completed, True, ended
            try:
                self._stream.write(line + "\n")
                self._stream.flush()  # a log file is block-buffered: without this the lines come at exit
            except (OSError, ValueError):  # a closed or full log must not stop the work it reports on
                self._stream = None

    return LoggedProgress


def make_progress(transient: bool = False, get_time: Callable[[], float] | None = None):
    """A rich ``Progress`` with bar, counts, rate and ETA drawn on stderr when it is a terminal, which
    also writes plain lines on stdout when that is not one (see the module docstring).

    ``get_time`` replaces the monotonic clock (tests). Raises ConfigError for a malformed
    ``LAD_FAST_PROGRESS_INTERVAL``.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    logged = lines_enabled()
    return _make_class()(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not progress_enabled(),
        transient=transient,
        # stdout that is a file stays the file's: the bar must not pull prints (and our lines) to stderr
        redirect_stdout=not logged,
        get_time=get_time,
        stream=sys.stdout if logged else None,
        interval=line_interval() if logged else 0.0,
    )


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    get_time: Callable[[], float] | None = None,
) -> Iterator[T]:
    """Iterate with progress (a bar on a terminal stderr, plain lines on a non-terminal stdout)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress(get_time=get_time) as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


def say(msg: str) -> None:
    """One status line on stderr, ``lad-fast <msg>`` (shown even when progress bars are quiet)."""
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: a long path must not be cut into several lines on a narrow or absent terminal
    Console(stderr=True, soft_wrap=True, highlight=False).print(f"[bold cyan]lad-fast[/] {escape(msg)}")
