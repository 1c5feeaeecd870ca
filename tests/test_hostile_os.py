"""A failing machine and bad command-line values: a full disk (numpy's errno-less short write included),
a read-only file system, permission denied, a file where a folder is needed, a negative seed and an
absurd thread count are each one line, exit 2 (or a warning and a correct run), with nothing
half-written and no empty output folder left behind.

Read-only and full file systems are real tmpfs mounts where this machine lets tests mount (root); the
same errors are also raised by monkeypatching, since root ignores ``chmod`` and not every CI may mount.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _mounts import tmpfs

from lad_fast.cli.app import main, os_error_line
from lad_fast.cli.options import MAX_SEED
from lad_fast.config import get_preset
from lad_fast.data.phantom.draw import write_phantoms
from lad_fast.errors import ConfigError

TINY = get_preset("tiny")


def _cli(capsys, *argv: str) -> str:
    """The error line of a refused command (status lines may come before it)."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    line = err.splitlines(keepends=True)[-1]
    assert line.startswith("lad-fast: error: ") and err.count("error") == 1, err
    assert "Traceback" not in err
    return line


def _source(root: Path) -> Path:
    """One CT the tiny preset accepts, as ``root/images/c1.nii.gz``."""
    ct = np.full((40, 40, 12), -1000.0, np.float32)
    ct[5:35, 6:34] = 40.0 + np.random.default_rng(0).normal(0, 5, size=(30, 28, 12))
    (root / "images").mkdir(parents=True)
    nib.save(nib.Nifti1Image(ct, np.diag([6.4, 6.4, 4.6, 1.0])), str(root / "images" / "c1.nii.gz"))
    return root


def _prepare(capsys, src: Path, out: Path) -> str:
    return _cli(capsys, "prepare", str(src), str(out), "--preset", "tiny")


# ------------------------------------------------------------------------------------ full disk


def test_prepare_on_a_really_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys):
    src = _source(tmp_path / "src")
    with tmpfs(tmp_path / "small", size="64k") as small:  # the 128 KiB image.npy cannot fit
        err = _prepare(capsys, src, small / "out")
        assert err.startswith(
            f"lad-fast: error: {small / 'out' / 'cases' / 'c1'}: no space left on the device"
        )
        assert list(small.iterdir()) == []


def test_prepare_on_numpys_short_write_is_one_line(tmp_path, capsys, monkeypatch):
    src = _source(tmp_path / "src")

    def short(*args, **kwargs):
        raise OSError("65536 requested and 8064 written")  # no errno, as numpy raises it

    monkeypatch.setattr(np, "save", short)
    err = _prepare(capsys, src, tmp_path / "out")
    assert f"{tmp_path / 'out' / 'cases' / 'c1'}: no space left on the device while writing it" in err
    assert not (tmp_path / "out").exists()


def test_masks_written_on_numpys_short_write_are_one_error_and_the_dataset_stays_whole(
    tiny_phantoms, tmp_path, monkeypatch
):
    """predict-masks and import-masks write through ``set_masks``: a full disk names the mask file, and
    the index never lists a mask that was not written."""
    import shutil

    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.errors import DiskFullError

    data = shutil.copytree(tiny_phantoms, tmp_path / "data")
    ds = PreparedDataset(data)
    case = ds.case_ids[0]
    mask = np.asarray(ds[0]["mask"])

    def short(*args, **kwargs):
        raise OSError("65536 requested and 8064 written")

    monkeypatch.setattr(np, "save", short)
    with pytest.raises(DiskFullError) as exc:
        ds.set_masks({case: (mask, "predicted:runs/seg")}, TINY.condition)
    assert str(exc.value).startswith(f"{data / 'cases' / case / 'mask.npy'}: no space left on the device")
    monkeypatch.undo()
    after = PreparedDataset(data)
    after.verify()
    assert after.entry(case)["has_mask"] is False  # listed again only once its mask is written


# ------------------------------------------------------------------- read-only, permissions, paths


def test_writing_commands_on_a_read_only_file_system_are_one_line(tmp_path, capsys, tiny_phantoms):
    src = _source(tmp_path / "src")
    train = ("train", "vqgan", "--data", str(tiny_phantoms), "--steps", "1", "--device", "cpu", "--run")
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        for argv, path in (
            (("prepare", str(src), str(ro / "out"), "--preset", "tiny"), ro / "out"),
            (("phantom", str(ro / "ph"), "--n", "1"), ro / "ph"),
            ((*train, str(ro / "run")), ro / "run"),
        ):
            err = _cli(capsys, *argv)
            assert err.startswith(f"lad-fast: error: {path}"), err
            assert err.endswith(": the file system is read-only; choose an output folder on a writable one\n")
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EROFS, "the file system is read-only; choose an output folder on a writable one"),
        (errno.EACCES, "permission denied; choose a folder you may write to (or fix its permissions)"),
        (errno.ENOSPC, "no space left on the device; free some space and rerun the same command"),
    ],
)
def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch, code, words):
    """As root, chmod 0o555 does not stop writes: the errno is raised where the folder is created."""
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    real = os.mkdir

    def refuse(path, *args, **kwargs):
        if Path(path) == out:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    assert _prepare(capsys, src, out) == f"lad-fast: error: {out}: {words}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_file_where_a_folder_is_needed_is_one_line(tmp_path, capsys):
    src = _source(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cases").write_text("not a folder")  # EEXIST
    err = _prepare(capsys, src, tmp_path / "out")
    cases = tmp_path / "out" / "cases"
    words = "exists, and is not the folder lad-fast needs there; move it away or choose another path"
    assert err == f"lad-fast: error: {cases}: {words}\n"
    (tmp_path / "file").write_text("x")  # ENOTDIR: a path through a file
    err = _cli(capsys, "phantom", str(tmp_path / "file" / "sub"), "--n", "1")
    words = "a part of this path is a file, not a folder; choose another path"
    assert err == f"lad-fast: error: {tmp_path / 'file' / 'sub'}: {words}\n"


def test_the_line_names_both_files_of_a_rename_and_falls_back_to_the_systems_words():
    err = OSError(errno.EXDEV, "Invalid cross-device link", "/a/x", None, "/b/y")
    assert os_error_line(err) == "/a/x -> /b/y: Invalid cross-device link"


def test_an_os_error_about_no_file_keeps_its_traceback(monkeypatch):
    from lad_fast.cli.app import app

    def broken():
        raise OSError("something without a file")

    info = next(c for c in app.registered_commands if c.name == "info")
    monkeypatch.setattr(info, "callback", broken)
    with pytest.raises(OSError, match="something without a file"):
        main(["info"])


# ------------------------------------------------------------------------------------------ seeds


@pytest.mark.parametrize(
    "argv",
    [
        ("phantom", "{out}"),
        ("generate", "--run", "{tmp}/run", "--out", "{out}"),
        ("ssl", "pretrain", "--run", "{out}"),
        ("ssl", "finetune", "--pretrained", "none", "--labelled", "1", "--run", "{out}"),
    ],
)
@pytest.mark.parametrize("seed", ["-5", str(MAX_SEED + 1)])
def test_every_seed_option_refuses_a_negative_or_huge_seed_before_writing(tmp_path, capsys, argv, seed):
    out = tmp_path / "out"
    filled = [a.format(out=out, tmp=tmp_path) for a in argv]
    err = _cli(capsys, *filled, "--seed", seed)
    assert err == f"lad-fast: error: --seed {seed}: give a whole number from 0 to {MAX_SEED}\n"
    assert list(tmp_path.iterdir()) == []  # no empty output folder


def test_the_phantom_library_refuses_a_negative_seed_before_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="phantom seed -5 must be 0 or more"):
        write_phantoms(tmp_path / "ph", n=1, cfg=TINY.phantom, seed=-5)
    assert not (tmp_path / "ph").exists()


# ---------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("value", ["99999", "5000", "9" * 40])
def test_an_absurd_thread_count_is_clamped_with_one_warning(value):
    """``LAD_FAST_THREADS=99999`` would crash OpenMP and ``=5000`` hang it: both run on the usable cores."""
    import torch

    from lad_fast.utils.threads import ThreadsClampedWarning, apply_thread_policy

    cores = len(os.sched_getaffinity(0))
    shown = value if len(value) <= 18 else value[:18] + "..."
    line = f"LAD_FAST_THREADS={shown} is more than the {cores} cores this process may run on; using {cores}"
    before = torch.get_num_threads()
    try:
        with pytest.warns(ThreadsClampedWarning) as caught:
            assert apply_thread_policy({"LAD_FAST_THREADS": value}) == cores
    finally:
        torch.set_num_threads(before)
    assert [str(w.message) for w in caught] == [line]
