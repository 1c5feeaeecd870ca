"""The worker thread behind the pipelined generator (lad_fast/utils/background.py)."""

from __future__ import annotations

import threading

import pytest

from lad_fast.errors import LadFastError
from lad_fast.utils.background import Background


def test_items_run_in_order_on_another_thread():
    seen: list[tuple[int, str]] = []
    with Background(lambda i: seen.append((i, threading.current_thread().name)), maxsize=2) as bg:
        for i in range(5):
            bg.submit(i)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"lad-fast-writer"}


def test_a_worker_error_surfaces_in_the_main_thread_as_it_was_and_drops_the_rest():
    done: list[int] = []
    release = threading.Event()

    def work(i: int) -> None:
        if i == 1:
            raise LadFastError("disk full while writing volume lad_000001; free space and rerun")
        release.wait(5)
        done.append(i)

    with pytest.raises(
        LadFastError, match=r"^disk full while writing volume lad_000001; free space and rerun$"
    ):
        with Background(work, maxsize=1) as bg:
            bg.submit(0)
            bg.submit(1)
            release.set()
            for i in range(2, 6):  # raises at one of these submits (or at close)
                bg.submit(i)
    assert done == [0]  # nothing after the failure ran


def test_an_interrupt_inside_the_worker_is_re_raised_as_an_interrupt():
    def work(i: int) -> None:
        raise KeyboardInterrupt

    bg = Background(work)
    bg.submit(0)
    with pytest.raises(KeyboardInterrupt):
        bg.close()


def test_a_main_thread_failure_lets_the_current_item_finish_and_drops_the_queued_ones():
    started, release, done = threading.Event(), threading.Event(), []

    def work(i: int) -> None:
        started.set()
        release.wait(5)
        done.append(i)

    with pytest.raises(RuntimeError, match="interrupted"):
        with Background(work, maxsize=1) as bg:
            assert not bg.cancelled
            bg.submit(0)
            started.wait(5)
            bg.submit(1)  # waits in the queue
            threading.Timer(0.2, release.set).start()  # item 0 ends after the failure below
            raise RuntimeError("interrupted")
    assert done == [0] and bg.cancelled


def test_the_queue_is_bounded():
    release = threading.Event()
    bg = Background(lambda i: release.wait(5), maxsize=1)
    bg.submit(0)  # taken by the worker
    bg.submit(1)  # fills the queue
    blocked = threading.Thread(target=bg.submit, args=(2,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # waits for room
    release.set()
    blocked.join(5)
    bg.close()
    with pytest.raises(ValueError, match="maxsize must be at least 1, got 0"):
        Background(print, maxsize=0)
