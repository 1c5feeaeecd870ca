"""What lad-fast owns in its output folders (issue 15, items 2, 9, 10): ``generate`` and ``train --force``
delete only files their own records list, a full disk is one line naming the path and the free space,
and temporaries of a killed run are cleaned on the next start (lad-fast's own names only)."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

import lad_fast.runs.checkpoints as ck
import lad_fast.utils.atomic as atomic
from lad_fast.errors import DiskFullError, InputError, LadFastError, OutputExistsError
from lad_fast.generate.writer import (
    DATASET_JSON,
    IDENTITY,
    IMAGES,
    MANIFEST,
    MASKS,
    VolumeWriter,
    finalize,
    read_manifest,
    volume_paths,
)
from lad_fast.runs.checkpoints import latest_step_dir, load_checkpoint, save_checkpoint

SETTINGS = {k: f"v-{k}" for k in IDENTITY}
AFFINE = np.diag([4.6, 6.4, 6.4, 1.0])


def _generated(out, n=2, settings=SETTINGS):
    w = VolumeWriter(out, settings)
    w.prepare(force=False)
    for i in range(n):
        w.write(i, np.full((4, 6, 5), -100.0), np.ones((4, 6, 5), np.uint8), AFFINE, {"seed": i, **settings})
    finalize(out)
    return w


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------- 2. generate owns only its manifest's files


def test_generate_never_writes_over_a_users_dataset_json(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / DATASET_JSON).write_text('{"name": "my nnU-Net task"}')
    for force in (False, True):
        with pytest.raises(
            OutputExistsError,
            match=r"o: dataset\.json was not written by generate, which writes its own there; move it out "
            r"of the folder or choose another --out \(--force never overwrites it\)",
        ):
            VolumeWriter(out, SETTINGS).prepare(force=force)
    assert json.loads((out / DATASET_JSON).read_text()) == {"name": "my nnU-Net task"}
    assert sorted(p.name for p in out.iterdir()) == [DATASET_JSON]


def test_force_deletes_only_the_volumes_its_manifest_lists(tmp_path):
    out = tmp_path / "o"
    _generated(out)
    (out / IMAGES / "patient1.nii.gz").write_bytes(b"a user's scan")
    (out / MASKS / ".keep").write_text("")
    with pytest.raises(
        OutputExistsError, match=r"holds files generate did not write \(images/patient1\.nii\.gz\)"
    ):
        VolumeWriter(out, SETTINGS).prepare(force=False)
    other = {**SETTINGS, "base_seed": 9}
    VolumeWriter(out, other).prepare(force=True)  # other settings: ours go
    assert read_manifest(out) == {} and not (out / DATASET_JSON).exists()
    assert not any(p.is_file() for i in range(2) for p in volume_paths(out, f"lad_00000{i}"))
    assert (out / IMAGES / "patient1.nii.gz").read_bytes() == b"a user's scan"
    assert (out / MASKS / ".keep").is_file()


def test_a_manifest_line_edited_to_point_outside_is_refused(tmp_path):
    out = tmp_path / "o"
    _generated(out)
    lines = (out / MANIFEST).read_text().splitlines()
    record = json.loads(lines[1])
    record["id"] = "../../victim"
    (out / MANIFEST).write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(
        InputError, match=r"manifest\.jsonl: the line of volume '\.\./\.\./victim' \(index 1\) was"
    ):
        read_manifest(out)
    with pytest.raises(InputError, match="edited or damaged"):
        finalize(out)
    assert json.loads((out / DATASET_JSON).read_text())["numTraining"] == 2  # the old one stays


# ------------------------------------------------------------------ 2. train --force keeps a user's files


def test_train_force_keeps_files_it_did_not_write(tmp_path):
    from train.test_loop import toy

    run = tmp_path / "r"
    toy.run_toy(run, toy.toy_cfg(steps=5, checkpoint_every=5))
    model_dir = run / "segmenter"
    (model_dir / "notes.txt").write_text("why this run")
    (model_dir / "previews").mkdir()
    (model_dir / "previews" / "step-00000005.png").write_bytes(b"png")
    (model_dir / "previews" / "mine.png").write_bytes(b"png")
    toy.run_toy(run, toy.toy_cfg(steps=3, checkpoint_every=3), force=True)
    assert (model_dir / "notes.txt").read_text() == "why this run"
    assert sorted(p.name for p in (model_dir / "previews").iterdir()) == ["mine.png"]
    assert load_checkpoint(model_dir, "segmenter").step == 3


# ------------------------------------------------------------------ 9. a full disk is one line


def test_a_full_disk_while_rewriting_the_manifest_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "o"
    _generated(out)
    before = (out / MANIFEST).read_bytes()
    monkeypatch.setattr(atomic.os, "replace", _enospc)
    with pytest.raises(DiskFullError) as info:
        finalize(out)
    message = str(info.value)
    assert message.startswith(f"{out / MANIFEST}: no space left on the device while writing it (")
    assert " free there); free some space and rerun the same command" in message and "\n" not in message
    assert isinstance(info.value, LadFastError) and isinstance(info.value, OSError)
    assert (out / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [DATASET_JSON, IMAGES, MANIFEST, MASKS]  # no temporary


def test_the_cli_prints_a_full_disk_as_one_line(tmp_path, monkeypatch, capsys):
    from lad_fast.cli.app import main

    monkeypatch.setattr(atomic.os, "replace", _enospc)
    with pytest.raises(SystemExit) as exc:
        main(["phantom", str(tmp_path / "ph"), "--n", "1", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert "no space left on the device while writing it" in err and "free there" in err


def _save(model_dir, step):
    return save_checkpoint(
        model_dir,
        step,
        modules={"model": torch.nn.Linear(3, 2)},
        state={"step": step},
        meta={"model": "vqgan"},
    )


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    ],
)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, failure):
    model_dir = tmp_path / "vqgan"
    _save(model_dir, 1)

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(DiskFullError, match=rf"^{model_dir / 'step-00000002'}: no space left on the device"):
        _save(model_dir, 2)
    assert latest_step_dir(model_dir).name == "step-00000001"
    assert sorted(p.name for p in model_dir.iterdir()) == ["latest", "step-00000001"]
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("pickling")))
    with pytest.raises(RuntimeError, match="pickling"):  # other failures are not called a full disk
        _save(model_dir, 2)


# ------------------------------------------------------------------ 10. leftovers and permissions


def test_generate_cleans_its_own_temporaries_only(tmp_path):
    out = tmp_path / "o"
    _generated(out, n=1)
    mine = [out / IMAGES / ".lad_000001.nii.gz.k2j4_x9a.tmp.nii.gz", out / ".manifest.jsonl.ab12cd34.tmp"]
    theirs = [out / IMAGES / ".DS_Store", out / ".notes.tmp"]
    for p in mine + theirs:
        p.write_bytes(b"")
    VolumeWriter(out, SETTINGS).prepare(force=False)
    assert [p.exists() for p in mine + theirs] == [False, False, True, True]


def test_a_killed_checkpoints_temporaries_are_cleaned_on_the_next_start(tmp_path):
    from train.test_loop import toy

    run = tmp_path / "r"
    toy.run_toy(run, toy.toy_cfg(steps=5, checkpoint_every=5))
    model_dir = run / "segmenter"
    pointer_tmp = model_dir / ".latest.ab12cd34.tmp"
    step_tmp = model_dir / ".step-00000010.zz99yy88.tmp"
    pointer_tmp.write_text("step-000")
    step_tmp.mkdir()
    (step_tmp / "model.safetensors").write_bytes(b"half")
    user = model_dir / ".latest-notes"
    user.write_text("mine")
    toy.run_toy(run, toy.toy_cfg(steps=5, checkpoint_every=5), resume=True)  # finished: no step written
    assert not pointer_tmp.exists() and not step_tmp.exists() and user.read_text() == "mine"


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o002)  # a lab's shared group
    try:
        step_dir = _save(tmp_path / "vqgan", 1)
    finally:
        os.umask(old)
    assert step_dir.stat().st_mode & 0o777 == 0o775
    assert {p.name: p.stat().st_mode & 0o777 for p in step_dir.iterdir()} == {
        "model.safetensors": 0o664,
        "state.pt": 0o664,
        "meta.json": 0o664,
        "digest": 0o664,
    }
    assert (tmp_path / "vqgan" / "latest").stat().st_mode & 0o777 == 0o664
