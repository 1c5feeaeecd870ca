"""``lad-fast export`` and the run's artefacts refuse bad input with one line that says why."""

from __future__ import annotations

import json
import sys

import pytest

from lad_fast.errors import BackendUnavailableError, CheckpointError, ConfigError, OutputExistsError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _no_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    import torch

    return not torch.cuda.is_available()


def _cli(capsys, *args) -> tuple[int, str]:
    from lad_fast.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["export", *map(str, args)])
    return exc.value.code, capsys.readouterr().err


@pytest.mark.skipif(not _no_tensorrt(), reason="TensorRT and CUDA are both here")
def test_trt_target_without_tensorrt_or_cuda_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(capsys, "--run", tiny_run, "--target", "trt", "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("lad-fast: error: ")
    assert 'pip install "lad-fast[trt]"' in err and "NVIDIA GPU" in err
    assert not out.exists()


def test_fp16_without_modelopt_names_the_package_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    from lad_fast.export.run_export import export_run

    monkeypatch.setitem(sys.modules, "modelopt.onnx.autocast", None)  # import raises ImportError
    out = tmp_path / "out"
    with pytest.raises(BackendUnavailableError) as exc:
        export_run(tiny_run, out, precision="fp16")
    msg = str(exc.value)
    assert "NVIDIA ModelOpt's ONNX AutoCast, which is not installed" in msg
    assert 'pip install "lad-fast[export]"' in msg and "nvidia-modelopt" in msg and "--precision fp32" in msg
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "why"),
    [("1:4", "expected MIN:OPT:MAX"), ("4:2:16", "need 1 <= MIN <= OPT <= MAX"), ("0:1:2", "need 1 <=")],
)
def test_bad_batch_range_is_refused_before_the_run_is_read(tmp_path, capsys, text, why):
    code, err = _cli(capsys, "--run", tmp_path / "nowhere", "--batch-range", text)
    assert code == 2 and f"--batch-range '{text}': {why}" in err


def test_foreign_files_in_out_are_refused_and_force_deletes_only_the_exports_own(tiny_run, tmp_path):
    from lad_fast.export.run_export import export_run

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"holds files lad-fast did not write \(notes.txt\).*--force"):
        export_run(tiny_run, out, precision="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    written = export_run(tiny_run, out, precision="fp32", force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir() if p.name != "notes.txt")

    # an earlier export is not overwritten without --force either
    (out / "notes.txt").unlink()
    with pytest.raises(OutputExistsError, match="holds an earlier export; choose an empty folder, or pass"):
        export_run(tiny_run, out, precision="fp32")
    (out / "notes.txt").write_text("mine")
    # --force replaces the export's own files, keeps the foreign one, and refuses to overwrite one that
    # has the name of an artefact but no metadata of lad-fast
    (out / "decoder.fp32.onnx.json").unlink()
    (out / "decoder.fp32.onnx").write_text("someone else's graph")
    with pytest.raises(OutputExistsError, match="holds decoder.fp32.onnx, which lad-fast export did not"):
        export_run(tiny_run, out, precision="fp32", force=True)
    assert (out / "decoder.fp32.onnx").read_text() == "someone else's graph"
    assert (out / "notes.txt").read_text() == "mine"


def test_metadata_cannot_make_force_delete_other_files(tmp_path):
    from lad_fast.export.artefacts import FORMAT, owned_files, prepare_out

    (tmp_path / "config.json").write_text("{}")
    bogus = {"format": FORMAT, "file": "config.json", "files": ["config.json", "config.json.json"]}
    (tmp_path / "config.json.json").write_text(json.dumps(bogus))
    assert owned_files(tmp_path) == set()
    prepare_out(tmp_path, ["denoiser.fp32.onnx"], force=True)
    assert (tmp_path / "config.json").exists()


def test_stale_changed_and_foreign_artefacts_are_refused_by_generate(run_copy, tmp_path):
    from lad_fast.export.run_export import export_run
    from lad_fast.generate.generate import generate

    export_run(run_copy, precision="fp32")
    art = run_copy / "export" / "denoiser.fp32.onnx"
    meta_file = art.with_name(art.name + ".json")
    settings = {"n": 1, "sampler": "ddim", "steps": 2, "augment": 0, "backend": "onnx", "device": "cpu"}

    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "checkpoint": "0123456789abcdef"}))
    out = tmp_path / "gen"
    with pytest.raises(
        CheckpointError,
        match=r"denoiser.fp32.onnx cannot be used: it was exported from checkpoint 0123456789abcdef, the run "
        r"now holds [0-9a-f]{16}; re-export it with `lad-fast export --run .* --force`",
    ):
        generate(run_copy, out, **settings)
    assert not out.exists()  # refused before the output folder was made

    meta_file.write_text(json.dumps(meta))
    art.write_bytes(art.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="the file changed since it was exported"):
        generate(run_copy, out, **settings)

    meta_file.unlink()
    with pytest.raises(
        CheckpointError, match=r"was not written by lad-fast export \(no denoiser.fp32.onnx.json"
    ):
        generate(run_copy, out, **settings)
    assert not out.exists()


def _engine_meta(tmp_path, **over):
    from lad_fast.export.artefacts import write_meta

    path = tmp_path / "denoiser.fp16.engine"
    path.write_bytes(b"engine")
    meta = write_meta(path, target="trt", precision="fp16", kind="denoiser", checkpoint="c0ffee",
                      batch={"min": 1, "opt": 4, "max": 16})  # fmt: skip
    meta.update(over)
    path.with_name(path.name + ".json").write_text(json.dumps(meta))
    return path


def test_engine_of_another_tensorrt_gpu_or_batch_is_refused_with_each_reason(tmp_path):
    from lad_fast.export.artefacts import check_artefact

    path = _engine_meta(
        tmp_path,
        versions={"tensorrt": "10.9.0.34"},
        gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
    )
    with pytest.raises(CheckpointError) as exc:
        check_artefact(path, checkpoint="c0ffee", batch=32, run=tmp_path)
    msg = str(exc.value)
    assert "denoiser.fp16.engine cannot be used: " in msg
    assert "it was built with TensorRT 10.9.0.34, this machine has TensorRT " in msg
    assert "it was built for GPU NVIDIA H100 80GB HBM3 (compute capability 9.0), this machine has " in msg
    assert "--batch 32 is outside its optimisation profile (1..16 volumes per call)" in msg
    assert "--target trt --batch-range 1:32:32" in msg


def test_engine_metadata_records_versions_and_a_batch_inside_the_profile_passes(tmp_path):
    from lad_fast.export.artefacts import check_artefact

    path = _engine_meta(tmp_path)  # written here: this machine's TensorRT version and GPU (none)
    assert check_artefact(path, checkpoint="c0ffee", batch=16)["batch"]["max"] == 16
    with pytest.raises(CheckpointError, match="--batch 17 is outside its optimisation profile"):
        check_artefact(path, checkpoint="c0ffee", batch=17)


def test_unknown_target_and_precision_are_named():
    from lad_fast.export.run_export import export_run

    with pytest.raises(ConfigError, match="unknown --target 'tflite'; choose one of: onnx, trt"):
        export_run("unused", target="tflite")
    with pytest.raises(ConfigError, match="unknown --precision 'int8'; choose one of: fp32, fp16, bf16"):
        export_run("unused", precision="int8")


def test_generate_refuses_a_batch_above_the_engine_profile_before_writing(run_copy, tmp_path, monkeypatch):
    """The engine and TensorRT are stand-ins (neither runs here): what is tested is that generate reads
    the engine's metadata and refuses ``--batch`` above its profile before anything is written."""
    import types

    import lad_fast.export.tensorrt as trt_mod
    from lad_fast.export.artefacts import write_meta
    from lad_fast.generate.generate import generate
    from lad_fast.runs.loading import checkpoint_hash

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    engine = run_copy / "export" / "denoiser.fp16.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"engine")
    ckpt = checkpoint_hash(run_copy / "diffusion")
    write_meta(engine, target="trt", precision="fp16", kind="denoiser", checkpoint=ckpt,
               batch={"min": 1, "opt": 4, "max": 16})  # fmt: skip
    out = tmp_path / "gen"
    with pytest.raises(CheckpointError, match=r"--batch 32 is outside its optimisation profile \(1\.\.16 "):
        generate(run_copy, out, n=2, batch=32, sampler="ddim", steps=2, backend="trt", device="cpu")
    assert not out.exists()
