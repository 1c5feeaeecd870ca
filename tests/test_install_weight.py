"""Install weight: Triton is an optional extra (the CPU install runs the main job without it; asking for
the Triton kernels without it says how to install them), and the README says where the phantom cache is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lad_fast.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI with triton made unimportable (``sys.modules[name] = None``: ``import`` raises ImportError
# and ``importlib.util.find_spec`` answers None, as on a machine without the wheel).
NO_TRITON = "import sys; sys.modules['triton'] = None; from lad_fast.cli.app import main; main(sys.argv[1:])"


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1", **env}
    environ.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", NO_TRITON, *args], env=environ, capture_output=True, text=True, timeout=600
    )


def test_triton_is_an_extra_that_dev_and_gpu_include():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    for extra in ("triton", "gpu", "dev"):
        assert any(d.startswith("triton>=") for d in project["optional-dependencies"][extra]), extra


def test_impl_triton_without_triton_names_the_extra(monkeypatch):
    from lad_fast.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "_TRITON_FOUND", False)
    x = torch.zeros(2)
    assert _dispatch.resolve_impl("auto", x) == "torch"
    with pytest.raises(BackendUnavailableError, match=r"needs the triton package.*\"lad-fast\[triton\]\""):
        _dispatch.resolve_impl("triton", x)
    monkeypatch.setenv("LAD_FAST_KERNELS", "triton")
    with pytest.raises(BackendUnavailableError, match=r"LAD_FAST_KERNELS=triton"):
        _dispatch.resolve_impl("auto", x)


def test_bench_kernels_without_triton_says_how_to_install(monkeypatch, capsys):
    from lad_fast.cli.app import main
    from lad_fast.kernels import _dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no triton
    monkeypatch.setattr(_dispatch, "_TRITON_FOUND", False)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernels", "--no-write"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        'lad-fast: error: lad-fast bench kernels needs the triton package: pip install "lad-fast[triton]"\n'
    )


def test_cli_without_triton_reports_it_and_refuses_forced_triton_kernels(tiny_phantoms, tmp_path):
    info = _cli("info", COLUMNS="200")  # the table on one line per row
    assert info.returncode == 0, info.stderr
    assert "no (optional: pip install 'lad-fast[triton]')" in info.stdout
    forced = _cli(
        "train", "vqgan", "--data", str(tiny_phantoms), "--run", str(tmp_path / "r"), "--steps", "1",
        "--device", "cpu", LAD_FAST_KERNELS="triton",
    )  # fmt: skip
    assert forced.returncode == 2, forced.stderr
    last = forced.stderr.strip().splitlines()[-1]
    assert last.startswith("lad-fast: error: impl='triton' (or LAD_FAST_KERNELS")
    assert 'pip install "lad-fast[triton]"' in forced.stderr


@pytest.mark.slow
def test_main_job_runs_without_triton(tiny_phantoms, tmp_path):
    """The README's main job (train every stage, then generate), a step each, with triton absent."""
    run, out = tmp_path / "run", tmp_path / "gen"
    cpu = ("--device", "cpu")
    trained = _cli("train", "--data", str(tiny_phantoms), "--run", str(run), "--steps", "1", *cpu)
    assert trained.returncode == 0, trained.stderr
    made = _cli("generate", "--run", str(run), "--n", "1", "--out", str(out), "--steps", "2", *cpu)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == ["lad_000000.nii.gz"]


def test_readme_says_where_the_phantom_cache_is_and_how_to_clear_it(tiny_phantoms, monkeypatch):
    from lad_fast.data.cache import cache_root

    readme = (ROOT / "README.md").read_text()
    assert "`~/.cache/lad-fast/phantoms-<preset>-n<N>-s<seed>/`" in readme
    assert "`$LAD_FAST_CACHE` moves it" in readme and "`rm -rf ~/.cache/lad-fast`" in readme
    # ... and that is where the code puts them
    assert tiny_phantoms.parent.name == "phantoms-tiny-n3-s0"
    monkeypatch.delenv("LAD_FAST_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lad-fast"
    monkeypatch.setenv("LAD_FAST_CACHE", "/somewhere")
    assert cache_root() == Path("/somewhere")
