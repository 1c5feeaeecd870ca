"""Smoke test of the installed wheel: run from a venv holding lad-fast installed NON-editable.

Imports every module of every package the wheel holds (from the installed files, not this checkout),
then runs ``lad-fast --help`` and every subcommand's ``--help``. Prints one closing line
``wheel smoke: N passed, M failed`` and exits non-zero on any failure.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

# Top-level modules of optional extras; a module that imports one at the top may skip without it.
OPTIONAL = {"triton", "tensorrt", "onnx", "onnxruntime", "modelopt", "cupy", "pydicom"}


def _command_paths() -> list[list[str]]:
    """Every command and subcommand of the Typer app, as argument lists (the root is [])."""
    import typer

    from lad_fast.cli.app import app

    paths: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():  # groups have subcommands
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def main() -> int:
    import lad_fast

    here = os.path.dirname(lad_fast.__file__)
    if "site-packages" not in here:
        print(f"lad_fast imported from {here}, not from an installed wheel", file=sys.stderr)
        return 1
    failures: list[str] = []
    skipped: list[str] = []
    passed = 0
    for mod in pkgutil.walk_packages(lad_fast.__path__, "lad_fast."):
        try:
            importlib.import_module(mod.name)
            passed += 1
        except ModuleNotFoundError as exc:
            if exc.name not in OPTIONAL:  # an extra's module (the Triton kernels) needs that extra
                failures.append(f"import {mod.name}: {exc!r}")
            else:
                skipped.append(f"{mod.name} (needs {exc.name})")
        except Exception as exc:  # noqa: BLE001 (every failure is reported)
            failures.append(f"import {mod.name}: {exc!r}")
    exe = os.path.join(os.path.dirname(sys.executable), "lad-fast")
    commands = [[exe, *path, "--help"] for path in _command_paths()]
    for cmd in commands:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{' '.join(cmd[1:])}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        else:
            passed += 1
    for f in failures:
        print("FAIL", f)
    print(f"wheel smoke: skipped without their extra: {', '.join(skipped) or 'none'}")
    print(f"wheel smoke: {passed} passed, {len(failures)} failed ({len(commands)} commands)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
