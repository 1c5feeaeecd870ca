from __future__ import annotations

import pytest

from lad_fast.utils.atomic import atomic_dir, atomic_path, write_json


def test_failed_write_leaves_target_untouched(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text().strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "case"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "y").write_text("2")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    assert [p.name for p in tmp_path.iterdir()] == ["case"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
    finally:
        os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
