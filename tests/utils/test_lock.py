"""The folder lock of ``generate --out`` and of a training run: one writer, stale-lock take-over, ranks,
and no empty folder left behind by a refusal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lad_fast.cli.app import main
from lad_fast.errors import CheckpointError, FolderInUseError
from lad_fast.utils.lock import LOCK_NAME, FolderLock, StaleLockWarning, locks_folder


def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "command": "generate", "started": "then"}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return folder / LOCK_NAME


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from lad_fast.utils.lock import FolderLock\n"
            "with FolderLock(sys.argv[1], 'generate'):\n    print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            FolderInUseError, match=rf"^{out} is in use by `lad-fast generate` \(pid {holder.pid} "
        ):
            FolderLock(out, "generate").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # the killed holder's lock stays, and is stale now
    with pytest.warns(
        StaleLockWarning, match=rf"took over the lock of `lad-fast generate` \(pid {holder.pid}"
    ):
        with FolderLock(out, "generate"):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_cli_generate_and_train_refuse_a_locked_folder_in_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    _write_lock(out, os.getppid())  # a live process of this machine
    (out / "keep.txt").write_text("mine")
    for argv in (
        ["generate", "--run", str(tmp_path / "nowhere"), "--out", str(out), "--n", "1"],
        ["train", "vqgan", "--run", str(out), "--steps", "1"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        # train may print its data split first (status lines); the error itself is one line, the last
        *status, err = capsys.readouterr().err.splitlines()
        assert exc.value.code == 2 and not any(line.startswith("lad-fast: error") for line in status), status
        assert err.startswith(f"lad-fast: error: {out} is in use by `lad-fast generate` (pid {os.getppid()}")
        assert err.endswith(f"(if that process is gone, delete {out / LOCK_NAME})")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "keep.txt"]


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="elsewhere.example")
    with pytest.raises(FolderInUseError, match=r"pid \d+ on elsewhere\.example"):
        FolderLock(tmp_path, "train").acquire()


def test_an_empty_lock_is_stale_only_after_a_grace_period(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(FolderInUseError, match="in use by a lad-fast process that is starting"):
        FolderLock(tmp_path, "train").acquire()
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with pytest.warns(StaleLockWarning), FolderLock(tmp_path, "train"):
        pass


def test_a_refused_call_leaves_no_folder_it_created(tmp_path):
    from lad_fast.generate.generate import generate

    out = tmp_path / "new" / "deeper" / "o"
    with pytest.raises(CheckpointError, match="does not exist"):
        generate(tmp_path / "nowhere", out, n=1, device="cpu")
    assert not (tmp_path / "new").exists()


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    seen = []

    @locks_folder("folder", "test")
    def work(folder: Path) -> None:
        seen.append((folder / LOCK_NAME).is_file())

    work(tmp_path / "a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    work(tmp_path / "b")
    assert seen == [True, False] and list((tmp_path / "a").iterdir()) == []  # released after success


def test_cli_data_commands_refuse_a_locked_dataset_in_one_line(tmp_path, capsys):
    """prepare, predict-masks and import-masks write into a prepared folder: one writer at a time."""
    data = tmp_path / "prepared"
    _write_lock(data, os.getppid())  # a live process of this machine
    for argv in (
        ["prepare", str(tmp_path / "src"), str(data)],
        ["predict-masks", str(data), "--run", str(tmp_path / "seg")],
        ["import-masks", str(data), str(tmp_path / "masks")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        (err,) = capsys.readouterr().err.splitlines()
        assert exc.value.code == 2, argv
        assert err.startswith(f"lad-fast: error: {data} is in use by `lad-fast generate` (pid {os.getppid()}")
    assert [p.name for p in data.iterdir()] == [LOCK_NAME]


def test_the_phantom_cache_waits_for_another_process_preparing_it(tmp_path):
    """Two jobs started together on a fresh cache: the second waits for the first's dataset, then uses it."""
    import threading

    from lad_fast.config import get_preset
    from lad_fast.data import cache

    prepared = tmp_path / "prepared"
    lock = _write_lock(prepared, os.getppid())

    def finish() -> None:
        time.sleep(1.0)
        (prepared / "index.json").write_text(json.dumps({"cases": [{}, {}]}))
        lock.unlink()

    other = threading.Thread(target=finish)
    other.start()
    t0 = time.monotonic()
    cache._prepare_or_wait(tmp_path / "raw-never-read", prepared, get_preset("tiny"), n=2, timeout_s=30)
    other.join()
    assert time.monotonic() - t0 >= 0.9  # it waited rather than refusing or preparing over it

    _write_lock(prepared, os.getppid())
    (prepared / "index.json").unlink()
    with pytest.raises(FolderInUseError, match=r"preparing this phantom cache for over 1 s; run again once"):
        cache._prepare_or_wait(tmp_path / "raw", prepared, get_preset("tiny"), n=2, timeout_s=1)
