"""The generated-dataset folder on its own (no model): atomic volume + manifest line, resume, torn lines,
rank shards and their merge, refusals of foreign files and other settings, manifest ids as paths, and
nnU-Net v2's view of the folder (layout "nnunet")."""

from __future__ import annotations

import errno
import json

import nibabel as nib
import numpy as np
import pytest

from lad_fast.errors import ConfigError, DiskFullError, InputError, LadFastError, OutputExistsError
from lad_fast.generate.writer import (
    DATASET_JSON,
    IDENTITY,
    MANIFEST,
    VolumeWriter,
    finalize,
    is_complete,
    nnunet_paths,
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


# nnU-Net v2's view (layout "nnunet"): imagesTr/<id>_0000.nii.gz and labelsTr/<id>.nii.gz linked to
# images/ and masks/ at finalize. nnU-Net's own integrity check reads it in tests/generate/test_layouts.py.


def _view(out) -> list[str]:
    return sorted(
        f"{p.parent.name}/{p.name}" for sub in ("imagesTr", "labelsTr") for p in (out / sub).iterdir()
    )


def _linked(out, i: int) -> bool:
    return all(
        dst.samefile(src)
        for src, dst in zip(volume_paths(out, volume_id(i)), nnunet_paths(out, volume_id(i)), strict=True)
    )


def test_the_nnunet_view_links_each_complete_volume_at_finalize(tmp_path):
    out = tmp_path / "o"
    w = _writer(out, layout="nnunet")
    for i in range(2):
        _write(w, i)
    assert not (out / "imagesTr").exists()  # volumes are written as in the default layout
    assert w.finalize() == 2
    assert _view(out) == ["imagesTr/lad_000000_0000.nii.gz", "imagesTr/lad_000001_0000.nii.gz",
                          "labelsTr/lad_000000.nii.gz", "labelsTr/lad_000001.nii.gz"]  # fmt: skip
    assert _linked(out, 0) and _linked(out, 1)  # hard links: the same files, no extra space
    assert sorted(p.name for p in out.iterdir()) == [
        DATASET_JSON, "images", "imagesTr", "labelsTr", MANIFEST, "masks"
    ]  # fmt: skip
    ds = json.loads((out / DATASET_JSON).read_text())
    assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz" and ds["numTraining"] == 2
    assert ds["labels"]["background"] == 0 and sorted(ds["labels"].values()) == list(range(12))


def test_resume_and_a_remade_volume_keep_the_view_in_step_with_the_manifest(tmp_path):
    out = tmp_path / "o"
    w = _writer(out, layout="nnunet")
    for i in range(3):
        _write(w, i)
    w.finalize()
    volume_paths(out, volume_id(1))[1].unlink()  # volume 1 lost its mask: no longer complete
    w = _writer(out, layout="nnunet")  # the rerun
    assert w.todo(4) == [1, 3]
    assert finalize(out) == 2  # a finalize before it is made again drops it from the view
    assert "labelsTr/lad_000001.nii.gz" not in _view(out) and "imagesTr/lad_000001_0000.nii.gz" not in _view(
        out
    )
    for i in (1, 3):
        _write(w, i)
    assert w.finalize() == 4 and len(_view(out)) == 8
    assert all(_linked(out, i) for i in range(4))  # volume 1's new files, not the old image


def test_a_folder_with_the_view_keeps_it_and_a_default_folder_gets_it_on_request(tmp_path):
    out = tmp_path / "o"
    w = _writer(out)
    _write(w, 0)
    w.finalize()
    assert not (out / "imagesTr").exists()  # the default layout has no view
    assert VolumeWriter(out, SETTINGS, layout="nnunet").finalize() == 1  # a rerun with --layout nnunet
    assert _view(out) == ["imagesTr/lad_000000_0000.nii.gz", "labelsTr/lad_000000.nii.gz"]
    _write(_writer(out), 1)  # a later default-layout rerun that adds a volume
    assert finalize(out) == 2 and len(_view(out)) == 4  # numTraining and imagesTr must agree for nnU-Net


def test_the_view_is_ours_for_prepare_force_and_leftovers(tmp_path):
    out = tmp_path / "o"
    w = _writer(out, layout="nnunet")
    _write(w, 0)
    w.finalize()
    killed = out / "imagesTr" / ".lad_000001_0000.nii.gz.k2j4_x9a.tmp.nii.gz"  # a kill mid-link
    killed.write_bytes(b"")
    VolumeWriter(out, SETTINGS, layout="nnunet").prepare(force=False)  # its own view is not foreign
    assert not killed.exists()
    (out / "labelsTr" / "case_7.nii.gz").write_bytes(b"a user's label")
    with pytest.raises(
        OutputExistsError, match=r"holds files generate did not write \(labelsTr/case_7\.nii\.gz\)"
    ):
        VolumeWriter(out, SETTINGS, layout="nnunet").prepare(force=False)
    VolumeWriter(out, {**SETTINGS, "steps": 7}, layout="nnunet").prepare(force=True)  # other settings
    assert _view(out) == ["labelsTr/case_7.nii.gz"]  # our volumes and their links gone, theirs kept


def test_where_links_are_refused_the_view_is_copies_made_once(tmp_path, monkeypatch):
    out = tmp_path / "o"
    w = _writer(out, layout="nnunet")
    _write(w, 0)

    def refused(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("os.link", refused)
    w.finalize()
    image, copy = volume_paths(out, volume_id(0))[0], nnunet_paths(out, volume_id(0))[0]
    assert not copy.samefile(image) and copy.read_bytes() == image.read_bytes()
    inode = copy.stat().st_ino
    w.finalize()
    assert copy.stat().st_ino == inode  # an up-to-date copy is not made again


@pytest.mark.parametrize(
    ("err", "kind", "message"),
    [
        (errno.ENOSPC, DiskFullError, r"imagesTr/lad_000000_0000\.nii\.gz: no space left on the device"),
        (errno.EIO, LadFastError, r"imagesTr/lad_000000_0000\.nii\.gz: cannot write nnU-Net's view of "
         r".*images/lad_000000\.nii\.gz \(.*I/O error.*\); check the folder and rerun the same command"),
    ],
)  # fmt: skip
def test_a_view_that_cannot_be_written_says_so_in_one_line(tmp_path, monkeypatch, err, kind, message):
    out = tmp_path / "o"
    w = _writer(out, layout="nnunet")
    _write(w, 0)

    def broken(src, dst):
        raise OSError(err, "No space left on device" if err == errno.ENOSPC else "I/O error")

    monkeypatch.setattr("os.link", broken)
    monkeypatch.setattr("shutil.copy2", broken)
    with pytest.raises(kind, match=message):
        w.finalize()
    assert not [p for p in out.rglob(".*")]  # no temporary left behind
    assert is_complete(out, read_manifest(out)[0])  # the volume itself is kept


def test_an_unknown_layout_is_refused():
    with pytest.raises(ConfigError, match="layout 'nnUNet' is not one of default, nnunet; use one of them"):
        VolumeWriter("o", SETTINGS, layout="nnUNet")
