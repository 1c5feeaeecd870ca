"""Progress bars for long work (rich), quiet when asked or when nothing is a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("LAD_FAST_QUIET", "") in ("", "0") and sys.stderr.isatty()


def make_progress(transient: bool = False):
    """A rich ``Progress`` with bar, counts, rate and ETA, drawn on stderr."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not progress_enabled(),
        transient=transient,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (no bar when stderr is not a terminal or LAD_FAST_QUIET=1)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
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
