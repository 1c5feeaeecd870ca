from __future__ import annotations

import subprocess
import sys

import pytest

from lad_fast.cli.app import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from lad_fast.cli.app import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_commands_without_heavy_imports():
    code = (
        "import sys; from lad_fast.cli.app import app; "
        "assert 'torch' not in sys.modules and 'nibabel' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("info", "phantom", "prepare", "preview", "train", "generate", "export", "bench"):
        assert cmd in out.stdout


def test_info_reports_backends(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for key in ("torch", "cuda", "triton", "onnxruntime", "tensorrt", "cupy"):
        assert key in text


def test_library_error_is_one_line_exit_2(tmp_path):
    out = run_cli("prepare", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("lad-fast: error: ")
    assert "missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_env_shows_traceback(tmp_path):
    import os

    env = dict(os.environ, LAD_FAST_DEBUG="1")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lad_fast.cli.app import main; main()",
            "prepare",
            str(tmp_path / "missing"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_the_cli_lets_idle_openmp_threads_sleep_unless_the_user_chose():
    from lad_fast.cli.app import cpu_wait_policy

    env: dict[str, str] = {}
    cpu_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpu_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    # the console entry point sets it before torch (which reads it when libgomp loads) is imported
    import subprocess
    import sys

    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import lad_fast.cli.app as a; "
        "assert 'torch' not in sys.modules; sys.argv = ['lad-fast', '--help']\n"
        "try:\n    a.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ['OMP_WAIT_POLICY'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "PASSIVE"
