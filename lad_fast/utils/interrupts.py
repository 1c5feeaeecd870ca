"""Graceful interrupts: Ctrl-C (SIGINT) and SIGTERM (what SLURM and Kubernetes send before preemption).

Two modes, both restoring the previous handlers on exit:

* :func:`raise_on_signals` (the CLI, around a whole command): a signal raises :class:`Interrupted` where the
  program is, like Ctrl-C does by default, but as an exception Typer does not swallow (it turns a
  ``KeyboardInterrupt`` into a silent exit 130), so the CLI can print one line and exit 130 / 143;
* :func:`deferred` (around long loops: training steps, generated volumes): a signal only sets a flag that the
  loop checks at a safe point (after a step, between volumes), where it saves its work and raises
  :class:`Interrupted` itself. A second signal while the first is pending stops at once (the user insists).

Signal handlers can only be installed from the main thread; elsewhere both are no-ops (the flag never
sets), and so are signals the parent process set to be ignored. Light on purpose: imported by the CLI
before torch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "StopFlag", "deferred", "raise_on_signals", "signal_name"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(BaseException):
    """Work stopped on SIGINT / SIGTERM. A ``BaseException`` like ``KeyboardInterrupt``, so ``except
    Exception`` clean-up code does not swallow it.

    signum: the signal; message: what was stopped and what was kept; resume_flag: what to add to the same
    command to continue (``"--resume"`` for training, ``""`` when rerunning it as is continues, None when
    there is nothing to continue). ``exit_code`` is the shell's convention, 128 + signum (130, 143).
    """

    def __init__(self, signum: int, message: str = "", resume_flag: str | None = None) -> None:
        self.signum, self.message, self.resume_flag = signum, message, resume_flag
        super().__init__(self.__str__())

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __str__(self) -> str:
        return self.line()

    def line(self, command: str | None = None) -> str:
        """One line: what stopped, what was kept, and how to continue (``command``, when the caller knows
        the full command line; otherwise the flag to add)."""
        out = f"interrupted ({signal_name(self.signum)})" + (f": {self.message}" if self.message else "")
        if command:
            return f"{out}; to continue: {command}"
        if self.resume_flag is None:
            return out
        return f"{out}; to continue, rerun " + (f"with {self.resume_flag}" if self.resume_flag else "it")


class StopFlag:
    """Set by the first SIGINT / SIGTERM inside :func:`deferred`; ``signum`` is the signal, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    if not _in_main_thread():
        yield
        return
    # A signal the parent set to be ignored (``cmd &`` in a script ignores SIGINT) stays ignored, as Python
    # itself does for SIGINT.
    previous = {s: signal.getsignal(s) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise :class:`Interrupted` (no message) where the program is."""
    with _handlers(_raise):
        yield


@contextlib.contextmanager
def deferred(stopping: str = "after the current step") -> Iterator[StopFlag]:
    """Inside, the first SIGINT / SIGTERM sets the yielded flag (and says so on stderr); a second one raises
    :class:`Interrupted` at once. ``stopping`` completes "lad-fast: <signal> received, stopping ..."."""
    import sys

    flag = StopFlag()

    def handler(signum: int, frame: object) -> None:
        if flag:
            raise Interrupted(signum, "stopped at once, without saving the work in flight")
        flag.signum = signum
        print(
            f"lad-fast: {signal_name(signum)} received, stopping {stopping} (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    with _handlers(handler):
        yield flag
