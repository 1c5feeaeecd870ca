"""A damaged ``manifest.jsonl`` is refused in one line naming the file and line, by every reader
(generate's resume, evaluate), and its damaged lines are never copied forward."""

from __future__ import annotations

import json

import pytest

from lad_fast.errors import InputError
from lad_fast.generate.writer import IDENTITY, MANIFEST, VolumeWriter, finalize, read_manifest

SETTINGS = {k: 1 for k in IDENTITY}


def _manifest(out, *lines: bytes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    (out / MANIFEST).write_bytes(b"".join(line + b"\n" for line in lines))


def _line(i: int) -> bytes:
    return json.dumps({"id": f"lad_{i:06d}", "index": i, **SETTINGS, "rank": 0}).encode()


def test_bytes_that_are_not_utf8_are_one_line_naming_the_file_and_line(tmp_path):
    out = tmp_path / "gen"
    _manifest(out, _line(0), b'{"id": "lad_000001", "index": 1, "seed": "\xff"}', _line(2))
    expected = rf"{out / MANIFEST}: line 2 holds bytes that are not UTF-8; .*delete that line"
    with pytest.raises(InputError, match=expected):
        read_manifest(out)  # what evaluate reads
    with pytest.raises(InputError, match=expected):
        VolumeWriter(out, SETTINGS).prepare(force=False)  # generate's resume
    with pytest.raises(InputError, match=expected):
        VolumeWriter(out, SETTINGS).prepare(force=True)


def test_lines_that_are_not_records_are_never_copied_forward(tmp_path):
    out = tmp_path / "gen"
    _manifest(out, _line(0), b"[1]", b'"text"', b"{}", _line(1))
    for i in (0, 1):
        for sub in ("images", "masks"):
            (out / sub / f"lad_{i:06d}.nii.gz").write_bytes(b"x")
    assert sorted(read_manifest(out)) == [0, 1]
    assert finalize(out) == 2
    assert (out / MANIFEST).read_bytes() == _line(0) + b"\n" + _line(1) + b"\n"


def test_a_line_with_missing_settings_counts_as_other_settings(tmp_path):
    out = tmp_path / "gen"
    _manifest(out, json.dumps({"id": "lad_000000", "index": 0}).encode())
    with pytest.raises(Exception, match=r"holds volumes generated with other settings \(base_seed: None"):
        VolumeWriter(out, SETTINGS).prepare(force=False)
