"""Progress for logs (lad_fast/utils/progress.py): plain lines on a non-terminal stdout at a steady
interval, a bar on a terminal stderr, nothing with LAD_FAST_QUIET."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from lad_fast.errors import ConfigError
from lad_fast.utils import progress as P


class Stream(io.StringIO):
    """A captured stream that says whether it is a terminal."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(capsys, monkeypatch) -> Callable[[], str]:
    """What reached stdout, captured as a file is (not a terminal; stderr is not one either, so no bar);
    the 30 s default interval."""
    monkeypatch.delenv("LAD_FAST_QUIET", raising=False)
    monkeypatch.delenv(P.INTERVAL_ENV, raising=False)
    return lambda: capsys.readouterr().out


def _train(clock: Clock, steps: int, seconds_per_step: float, start: int = 0) -> None:
    """Drive the progress as lad_fast/train/loop.py does: add_task, a status now and then, completed=step."""
    with P.make_progress(get_time=clock) as progress:
        task = progress.add_task("vqgan", total=steps, completed=start, status="")
        for step in range(start + 1, steps + 1):
            clock.now += seconds_per_step
            if step % 5 == 0:
                progress.update(task, status="rec 0.1234 3.20 vol/s")
            progress.update(task, completed=step)


def test_a_log_gets_one_line_per_interval_with_step_rate_eta_and_loss(log):
    clock = Clock()
    _train(clock, steps=100, seconds_per_step=2.0)  # 200 s of work, 30 s default interval
    lines = log().splitlines()
    # one line each 30 s of work (steps 15, 30, ... 90) and the last one at the end
    assert [line.split()[2] for line in lines] == [f"{s}/100" for s in (15, 30, 45, 60, 75, 90, 100)]
    assert lines[0] == "lad-fast vqgan 15/100 (15%) 2.0 s/it ETA 2m50s elapsed 30s | rec 0.1234 3.20 vol/s"
    assert lines[-1] == "lad-fast vqgan 100/100 (100%) 2.0 s/it elapsed 3m20s | rec 0.1234 3.20 vol/s"


def test_the_interval_comes_from_the_environment_and_a_fast_rate_reads_per_second(log, monkeypatch):
    monkeypatch.setenv(P.INTERVAL_ENV, "1")
    clock = Clock()
    _train(clock, steps=20, seconds_per_step=0.25)
    lines = log().splitlines()
    assert [line.split()[2] for line in lines] == ["4/20", "8/20", "12/20", "16/20", "20/20"]
    assert lines[1].startswith("lad-fast vqgan 8/20 (40%) 4.00 it/s ETA 3s elapsed 2s")


def test_a_resumed_run_rates_only_the_steps_made_now(log):
    clock = Clock()
    _train(clock, steps=1000, seconds_per_step=3.0, start=900)
    first = log().splitlines()[0]
    assert first.startswith("lad-fast vqgan 910/1000 (91%) 3.0 s/it ETA 4m30s elapsed 30s")


def test_work_shorter_than_the_interval_writes_nothing(log):
    clock = Clock()
    _train(clock, steps=10, seconds_per_step=1.0)
    assert log() == ""


def test_track_writes_lines_for_an_iterable_without_a_length(log, monkeypatch):
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    clock = Clock()
    seen = []
    for x in P.track((i for i in range(3)), "evaluate", get_time=clock):
        clock.now += 2.0
        seen.append(x)
    assert seen == [0, 1, 2]
    lines = log().splitlines()
    assert lines == [
        "lad-fast evaluate 1 2.0 s/it elapsed 2s",
        "lad-fast evaluate 2 2.0 s/it elapsed 4s",
        "lad-fast evaluate 3 2.0 s/it elapsed 6s",
    ]


@pytest.mark.parametrize("quiet", ["1", "yes"])
def test_lad_fast_quiet_silences_the_lines(log, monkeypatch, quiet):
    monkeypatch.setenv("LAD_FAST_QUIET", quiet)
    _train(Clock(), steps=100, seconds_per_step=2.0)
    assert log() == ""
    assert not P.lines_enabled() and not P.progress_enabled()


def test_a_terminal_stdout_gets_no_lines(monkeypatch):
    out = Stream(tty=True)
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", Stream())
    monkeypatch.delenv("LAD_FAST_QUIET", raising=False)
    _train(Clock(), steps=100, seconds_per_step=2.0)
    assert out.getvalue() == ""


def test_with_a_bar_on_the_terminal_the_lines_and_prints_still_reach_the_log(monkeypatch):
    """``lad-fast train > log.txt`` on a terminal: the bar draws on stderr; the bar must not take stdout."""
    out, err = Stream(), Stream(tty=True)
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.delenv("LAD_FAST_QUIET", raising=False)
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    assert P.progress_enabled() and P.lines_enabled()
    clock = Clock()
    with P.make_progress(get_time=clock) as progress:
        task = progress.add_task("generate", total=2, status="1.0 vol/min")
        print("a print during the work")
        clock.now += 60.0
        progress.update(task, completed=1)
    lines = out.getvalue().splitlines()
    assert lines == [
        "a print during the work",
        "lad-fast generate 1/2 (50%) 60.0 s/it ETA 1m00s elapsed 1m00s | 1.0 vol/min",
    ]
    assert "generate" in err.getvalue()  # the bar itself went to the terminal


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf"])
def test_a_malformed_interval_is_refused_with_what_to_set(log, monkeypatch, value):
    monkeypatch.setenv(P.INTERVAL_ENV, value)
    with pytest.raises(ConfigError) as err:
        P.make_progress()
    assert str(err.value) == (
        f"LAD_FAST_PROGRESS_INTERVAL='{value}' is not a number of seconds >= 0; "
        "set it to, say, 30 or unset it"
    )


def test_a_closed_log_does_not_stop_the_work(monkeypatch):
    log = Stream()
    monkeypatch.setattr("sys.stdout", log)
    monkeypatch.setattr("sys.stderr", Stream())
    monkeypatch.delenv("LAD_FAST_QUIET", raising=False)
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    clock = Clock()
    with P.make_progress(get_time=clock) as progress:
        task = progress.add_task("vqgan", total=3, status="")
        log.close()
        for step in (1, 2, 3):
            clock.now += 1.0
            progress.update(task, completed=step)
    assert progress.tasks[0].completed == 3


def test_durations_read_short():
    assert [P._duration(s) for s in (0.4, 59, 60, 3599, 3600, 7322)] == ["0s", "59s", "1m00s", "59m59s",
                                                                      "1h00m", "2h02m"]  # fmt: skip
