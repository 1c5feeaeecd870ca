"""An artefact and its metadata become visible together; an interrupted export is redone by ``export``
(with or without ``--force``) and by ``generate --backend onnx``; ``export`` holds the folder lock; damaged
metadata is refused in one line."""

from __future__ import annotations

import json
import os
import socket

import pytest

from lad_fast.errors import CheckpointError, FolderInUseError, OutputExistsError

pytest.importorskip("onnxruntime")


class Killed(BaseException):
    """Stands for SIGKILL at one point of the export: nothing after it runs."""


def _kill_at_rename(monkeypatch, name: str) -> None:
    """The export dies right after the metadata of ``name`` is written, before the graph is renamed."""
    import lad_fast.export.artefacts as artefacts

    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == name:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(artefacts.os, "replace", replace)


def test_an_export_killed_between_metadata_and_graph_is_redone(run_copy, tmp_path, monkeypatch):
    """By a plain ``export``; ``--force`` after a kill: test_a_later_pair_killed_is_redone_by_force."""
    from lad_fast.export.artefacts import read_meta
    from lad_fast.export.run_export import export_run
    from lad_fast.runs.loading import checkpoint_hash

    out = tmp_path / "out"
    _kill_at_rename(monkeypatch, "denoiser.fp32.onnx")
    with pytest.raises(Killed):
        export_run(run_copy, out, precision="fp32")
    # what a kill leaves: metadata naming a graph that is not in place (never a graph without metadata)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["denoiser.fp32.onnx.json"]
    monkeypatch.undo()
    written = export_run(run_copy, out, precision="fp32")
    assert sorted(p.name for p in written) == sorted(
        p.name for p in out.iterdir() if not p.name.startswith(".")
    )
    meta = read_meta(out / "denoiser.fp32.onnx")
    assert meta["checkpoint"] == checkpoint_hash(run_copy / "diffusion")
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


def test_a_later_pair_killed_is_redone_by_force(run_copy, tmp_path, monkeypatch):
    from lad_fast.export.run_export import export_run

    out = tmp_path / "out"
    _kill_at_rename(monkeypatch, "decoder.fp32.onnx")
    with pytest.raises(Killed):
        export_run(run_copy, out, precision="fp32")
    monkeypatch.undo()
    with pytest.raises(
        OutputExistsError, match="holds an earlier export; choose an empty folder, or pass --force"
    ):
        export_run(run_copy, out, precision="fp32")
    written = export_run(run_copy, out, precision="fp32", force=True)
    assert {p.name for p in written} >= {"decoder.fp32.onnx", "decoder.fp32.onnx.json"}
    assert (out / "decoder.fp32.onnx").is_file()


def test_generate_with_the_onnx_backend_redoes_an_interrupted_export(run_copy, tmp_path, monkeypatch):
    from lad_fast.export.run_export import export_run
    from lad_fast.generate.generate import generate

    export = run_copy / "export"
    _kill_at_rename(monkeypatch, "decoder.fp32.onnx")
    with pytest.raises(Killed):
        export_run(run_copy, precision="fp32")
    monkeypatch.undo()
    assert (export / "decoder.fp32.onnx.json").is_file() and not (export / "decoder.fp32.onnx").exists()
    generate(
        run_copy, tmp_path / "gen", n=1, sampler="ddim", steps=2, augment=0, backend="onnx", device="cpu"
    )
    assert (export / "decoder.fp32.onnx").is_file() and len(
        list((tmp_path / "gen" / "images").iterdir())
    ) == 1


def test_export_holds_the_folder_lock(run_copy, tmp_path):
    from lad_fast.export.run_export import export_run
    from lad_fast.utils.lock import LOCK_NAME

    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": "export", "started": "now"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(FolderInUseError, match=rf"{out} is in use by `lad-fast export`"):
        export_run(run_copy, out, precision="fp32")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ({"batch": [1, 4, 16]}, r"its batch is not \{min, opt, max\}"),
        ({"checkpoint": 7}, "its sha256 or checkpoint is not a string"),
        ({"target": "gpu"}, "its target 'gpu' is not one of onnx, trt"),
        ({"versions": "1.0"}, "its versions are not a mapping"),
    ],
)
def test_metadata_with_wrong_fields_is_refused_in_one_line(exported, tmp_path, edit, why):
    import shutil

    from lad_fast.export.artefacts import check_artefact

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    mp = out / "denoiser.fp32.onnx.json"
    meta = json.loads(mp.read_text())
    mp.write_text(json.dumps({**meta, **edit}))
    with pytest.raises(CheckpointError, match=rf"{mp} was edited or damaged \({why}\); re-export with"):
        check_artefact(out / "denoiser.fp32.onnx", checkpoint=meta["checkpoint"])


def test_metadata_with_bytes_that_are_not_utf8_is_one_line(exported, tmp_path):
    import shutil

    from lad_fast.export.artefacts import check_artefact

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "denoiser.fp32.onnx.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(
        CheckpointError, match=r"was not written by lad-fast export .*`lad-fast export --force`"
    ):
        check_artefact(out / "denoiser.fp32.onnx", checkpoint="0" * 16)
