"""``lad-fast bench kernels``: CPU message and exit 2, missing scripts, and the arguments it passes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from lad_fast.cli.bench_cmd import SCRIPTS, bench_app
from lad_fast.errors import InputError

REPO_BENCH = Path(__file__).resolve().parents[2] / "bench"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmarks really run")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")  # as cli/app.py registers it
    return app


def _results_snapshot() -> dict[str, int]:
    folder = REPO_BENCH / "results"
    return {p.name: p.stat().st_size for p in folder.glob("*.jsonl")} if folder.is_dir() else {}


@no_cuda
def test_cpu_says_cuda_is_needed_in_one_line_and_exits_2(monkeypatch, capsys):
    from lad_fast.cli.app import main

    monkeypatch.delenv("LAD_FAST_BENCH_DIR", raising=False)
    before = _results_snapshot()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernels", "--op", "all", "--dtype", "float16"])
    captured = capsys.readouterr()
    assert exc.value.code == 2  # it measured nothing: not a success
    assert captured.err == (
        "lad-fast: error: lad-fast bench kernels needs a CUDA GPU (the Triton kernels run there): "
        "nothing measured, no result written\n"
    )
    assert captured.out == ""
    assert _results_snapshot() == before


@no_cuda
@pytest.mark.parametrize("script", sorted(SCRIPTS.values()))
def test_each_script_exits_0_on_cpu_without_writing(script):
    before = _results_snapshot()
    out = subprocess.run(
        [sys.executable, str(REPO_BENCH / script), "--dtype", "float16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "needs a CUDA GPU" in out.stdout
    assert _results_snapshot() == before


def test_missing_scripts_say_where_they_were_expected(tmp_path):
    result = CliRunner().invoke(_app(), ["bench", "kernels", "--op", "vq", "--scripts", str(tmp_path)])
    assert isinstance(result.exception, InputError)
    with pytest.raises(InputError, match=rf"bench_vq_nearest.py not found in {tmp_path}.*--scripts"):
        raise result.exception


def test_bench_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAD_FAST_BENCH_DIR", str(tmp_path / "elsewhere"))
    result = CliRunner().invoke(_app(), ["bench", "kernels", "--op", "conv3d"])
    with pytest.raises(InputError, match=r"bench_conv3d.py not found in .*elsewhere"):
        raise result.exception


def _fake_scripts(folder: Path, exit_codes: dict[str, int]) -> None:
    """Stand-in scripts that record their argv and import a sibling helper, as the real ones do."""
    (folder / "_common.py").write_text("SEEN = []\n")
    for op, name in SCRIPTS.items():
        (folder / name).write_text(
            "from _common import SEEN\n"
            "def main(argv):\n"
            f"    SEEN.append(({op!r}, list(argv)))\n"
            f"    print('table of {op}')\n"
            f"    return {exit_codes.get(op, 0)}\n"
        )


def test_runs_the_chosen_scripts_with_the_options(tmp_path, monkeypatch):
    _fake_scripts(tmp_path, {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    args = [
        "bench",
        "kernels",
        "--op",
        "attention",
        "--dtype",
        "bfloat16",
        "--no-write",
        "--scripts",
        str(tmp_path),
    ]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "table of attention" in result.output and "table of vq" not in result.output
    assert sys.modules["_common"].SEEN == [("attention", ["--dtype", "bfloat16", "--no-write"])]
    assert str(tmp_path) not in sys.path  # the folder is only on sys.path while a script loads and runs
    monkeypatch.delitem(sys.modules, "_common")


def test_a_failing_script_fails_the_command(tmp_path, monkeypatch):
    _fake_scripts(tmp_path, {"conv3d": 3})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    result = CliRunner().invoke(_app(), ["bench", "kernels", "--scripts", str(tmp_path)])
    assert result.exit_code == 1
    assert [op for op, _ in sys.modules["_common"].SEEN] == ["vq", "attention", "conv3d"]
    assert "conv3d failed" in result.output
    monkeypatch.delitem(sys.modules, "_common")


def test_bench_sampler_prints_every_backend_and_the_official_baseline(tmp_path):
    before = _results_snapshot()
    args = ["bench", "sampler", "--backends", "torch,trt", "--n", "1", "--baseline-steps", "2", "--no-write"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "UNTRAINED networks" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert len(lines["torch"].split()) == 7  # backend and six numbers
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert "skipped: RuntimeError: TensorRT not installed" in lines["trt"]
    assert out.count("baseline (official)") == 1
    assert _results_snapshot() == before  # --no-write


def test_bench_sampler_without_its_script_says_where_it_looked(tmp_path):
    result = CliRunner().invoke(_app(), ["bench", "sampler", "--scripts", str(tmp_path)])
    with pytest.raises(InputError, match=rf"bench_sampler.py not found in {tmp_path}.*--scripts"):
        raise result.exception
