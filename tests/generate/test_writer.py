"""The generated-dataset folder on its own (no model): atomic volume + manifest line, resume, torn lines,
rank shards and their merge, refusals of foreign files and other settings, manifest ids as paths."""

from __future__ import annotations

import errno
import json

import nibabel as nib
import numpy as np
import pytest

from lad_fast.errors import InputError, LadFastError, OutputExistsError
from lad_fast.generate.writer import (
    DATASET_JSON,
    IDENTITY,
    MANIFEST,
    VolumeWriter,
    finalize,
    is_complete,
    read_manifest,
    volume_id,
    volume_paths,
)

SETTINGS = {k: f"v-{k}" for k in IDENTITY}
AFFINE = np.diag([4.6, 6.4, 6.4, 1.0])  # (D, H, W) steps of the tiny preset


def _volume(i: int) -> tuple[np.ndarray, np.ndarray]:
    hu = np.full((4, 6, 5), 10.0 * i - 100.0)
    mask = np.zeros((4, 6, 5), np.uint8)
    mask[1:3, 2:4, i % 5] = 1 + i % 3
    return hu, mask


def _writer(out, **kw) -> VolumeWriter:
    w = VolumeWriter(out, SETTINGS, **kw)
    if kw.get("rank", 0) == 0:
        w.prepare(force=False)
    return w


def _write(w: VolumeWriter, i: int) -> None:
    w.write(i, *_volume(i), AFFINE, {"seed": 100 + i, **SETTINGS})


def test_a_volume_is_its_two_files_then_its_manifest_line(tmp_path):
    w = _writer(tmp_path / "o")
    _write(w, 3)
    image, mask = volume_paths(tmp_path / "o", "lad_000003")
    assert image == tmp_path / "o" / "images" / "lad_000003.nii.gz" and mask.parent.name == "masks"
    np.testing.assert_array_equal(np.asarray(nib.load(str(image)).dataobj).transpose(2, 1, 0), _volume(3)[0])
    np.testing.assert_array_equal(np.asarray(nib.load(str(mask)).dataobj).transpose(2, 1, 0), _volume(3)[1])
    (line,) = (tmp_path / "o" / MANIFEST).read_text().splitlines()
    record = json.loads(line)
    assert list(record)[:3] == ["id", "index", "seed"] and list(record)[-1] == "rank"
    assert record["id"] == "lad_000003" and record["index"] == 3 and record["rank"] == 0
    assert read_manifest(tmp_path / "o") == {3: record} and is_complete(tmp_path / "o", record)


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (errno.ENOSPC, "no space left on device while writing volume lad_000001; free some space and rerun"),
        (errno.EIO, r"cannot write volume lad_000001 \(.*I/O.*\); check the folder and rerun"),
    ],
)
def test_a_failed_write_leaves_nothing_of_that_volume(tmp_path, monkeypatch, err, message):
    import lad_fast.utils.atomic

    w = _writer(tmp_path / "o")
    _write(w, 0)

    def broken(target, line):
        raise OSError(err, "No space left on device" if err == errno.ENOSPC else "I/O error")

    monkeypatch.setattr(lad_fast.utils.atomic, "append_line", broken)  # both files are in place by then
    with pytest.raises(LadFastError, match=message):
        _write(w, 1)
    assert sorted(p.name for p in (tmp_path / "o").rglob("*.nii.gz")) == ["lad_000000.nii.gz"] * 2
    assert list(read_manifest(tmp_path / "o")) == [0]
    assert not [p for p in (tmp_path / "o").rglob(".*")]  # no temporaries


def test_todo_skips_complete_volumes_and_redoes_incomplete_ones(tmp_path):
    out = tmp_path / "o"
    w = _writer(out)
    for i in range(3):
        _write(w, i)
    volume_paths(out, volume_id(1))[1].unlink()  # a line whose mask is gone: not complete
    (out / "images" / "lad_000004.nii.gz").write_bytes(b"")  # files without a line: not complete
    assert w.todo(5) == [1, 3, 4]


def test_a_torn_manifest_line_is_cut_before_the_next_append(tmp_path):
    out = tmp_path / "o"
    w = _writer(out)
    _write(w, 0)
    with open(out / MANIFEST, "a") as f:
        f.write('{"id": "lad_000001", "ind')  # a kill mid-append
    assert list(read_manifest(out)) == [0]  # the torn line is not a record
    assert w.todo(2) == [1]
    assert (out / MANIFEST).read_text().endswith("}\n")  # cut back to the last whole line
    _write(w, 1)
    assert [json.loads(x)["index"] for x in (out / MANIFEST).read_text().splitlines()] == [0, 1]


def test_rank_shards_split_the_ids_and_merge_into_one_manifest(tmp_path):
    out = tmp_path / "o"
    ranks = [_writer(out, rank=r, world=2, sharded=True) for r in (0, 1)]
    assert [w.todo(5) for w in ranks] == [[0, 2, 4], [1, 3]]
    for w in reversed(ranks):
        for i in w.todo(5):
            _write(w, i)
    assert sorted(p.name for p in out.iterdir()) == [
        "images",
        "manifest.rank0.jsonl",
        "manifest.rank1.jsonl",
        "masks",
    ]
    assert ranks[0].finalize() == 5
    lines = [json.loads(x) for x in (out / MANIFEST).read_text().splitlines()]
    assert [(r["index"], r["rank"]) for r in lines] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]
    assert sorted(p.name for p in out.iterdir()) == [DATASET_JSON, "images", MANIFEST, "masks"]
    ds = json.loads((out / DATASET_JSON).read_text())
    assert ds["numTraining"] == 5 and ds["training"][4]["label"] == "./masks/lad_000004.nii.gz"


def test_finalize_lists_only_complete_volumes(tmp_path):
    out = tmp_path / "o"
    w = _writer(out)
    for i in range(3):
        _write(w, i)
    volume_paths(out, volume_id(2))[0].unlink()
    assert finalize(out) == 2 and list(read_manifest(out)) == [0, 1]


def test_prepare_refuses_foreign_files_and_other_settings_unless_forced(tmp_path):
    out = tmp_path / "o"
    _write(_writer(out), 0)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputExistsError, match=r"holds files generate did not write \(notes\.txt\).*--force"
    ):
        VolumeWriter(out, SETTINGS).prepare(force=False)
    VolumeWriter(out, SETTINGS).prepare(force=True)  # same settings: the volume stays
    assert list(read_manifest(out)) == [0]
    (out / "notes.txt").unlink()
    other = {**SETTINGS, "steps": 7}
    with pytest.raises(
        OutputExistsError, match="other settings \\(steps: 'v-steps' -> 7\\); rerun with the same"
    ):
        VolumeWriter(out, other).prepare(force=False)
    (out / "notes.txt").write_text("mine")
    VolumeWriter(out, other).prepare(force=True)  # ours are deleted, foreign files kept
    assert read_manifest(out) == {} and not list(out.rglob("*.nii.gz"))
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        VolumeWriter(tmp_path / "file", SETTINGS).prepare(force=True)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "lad_000001/../x", "lad_000001\n", "", "/abs", 3])
def test_manifest_ids_are_checked_before_they_become_paths(tmp_path, bad):
    with pytest.raises(InputError, match="is not a volume id; the manifest is damaged"):
        volume_paths(tmp_path, bad)
    assert not is_complete(tmp_path, {"id": bad, "index": 0})
