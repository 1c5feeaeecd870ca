"""Failed atomic writes (lad_fast/utils/atomic.py) raise an OSError naming the target, never the hidden
temporary, leave the target untouched and no temporary behind; numpy's errno-less short write on a full
disk becomes a DiskFullError (ENOSPC)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from _mounts import tmpfs

import lad_fast.utils.atomic as atomic
from lad_fast.errors import DiskFullError
from lad_fast.utils.atomic import atomic_dir, atomic_path, write_failure, write_text

SHORT_WRITE = "65536 requested and 8064 written"  # what np.save raises on a full disk: no errno


def _save_short(*args, **kwargs):
    raise OSError(SHORT_WRITE)


def test_numpys_short_write_is_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "a.npy"
    target.write_bytes(b"old")
    monkeypatch.setattr(np, "save", _save_short)
    with pytest.raises(DiskFullError) as exc, atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, np.zeros(10))
    assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError)
    assert str(exc.value).startswith(f"{target}: no space left on the device while writing it (")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    # Only that exact message: another errno-less OSError is not taken for a full disk.
    assert write_failure(target, OSError("65536 requested")) is None
    assert write_failure(target, OSError(errno.EDQUOT, "Disk quota exceeded")) is not None


def test_a_real_short_write_on_a_full_file_system(tmp_path):
    with tmpfs(tmp_path / "small", size="64k") as small:
        with pytest.raises(DiskFullError, match=r"case: no space left on the device while writing it"):
            with (
                atomic_dir(small / "case") as folder,
                atomic_path(folder / "image.npy", suffix=".npy") as tmp,
            ):
                np.save(tmp, np.zeros(100_000, np.float32))  # 400 kB into 64 KiB
        assert list(small.iterdir()) == []  # no temporary file or folder left


def test_a_read_only_file_system_names_the_target(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True, fill=lambda p: (p / "kept.txt").write_text("x")) as ro:
        for write in (lambda: write_text(ro / "new.json", "{}"), lambda: atomic_dir(ro / "case").__enter__()):
            with pytest.raises(OSError) as exc:
                write()
            assert exc.value.errno == errno.EROFS and exc.value.filename in (
                str(ro / "new.json"),
                str(ro / "case"),
            )
        assert sorted(p.name for p in ro.iterdir()) == ["kept.txt"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_an_unwritable_folder_names_the_target_not_the_temporary(tmp_path, monkeypatch, code):
    """As root, chmod cannot make a folder unwritable: the errno is raised where the temporary is made."""

    def refuse(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's own parameter name)
        raise OSError(code, "refused", str(dir / ".x.abcdefgh.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    for target, write in (
        (tmp_path / "a.json", lambda t: write_text(t, "{}")),
        (tmp_path / "case", lambda t: atomic_dir(t).__enter__()),
    ):
        with pytest.raises(OSError) as exc:
            write(target)
        assert exc.value.errno == code
        assert exc.value.filename == str(target) or str(exc.value).startswith(f"{target}: no space left")
    assert list(tmp_path.iterdir()) == []


def test_an_error_about_another_file_passes_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError) as exc, atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text((tmp_path / "missing.txt").read_text())
    assert exc.value.filename == str(tmp_path / "missing.txt")
    assert list(tmp_path.iterdir()) == []
