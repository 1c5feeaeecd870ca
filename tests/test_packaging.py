"""The wheel holds every package: pyproject lists packages by hand (the package-dir mapping needs it).

A folder with an ``__init__.py`` under ``lad_fast/``, ``kernels/``, ``export/`` or ``cli/`` that the list
misses installs editable (CI's default) but is absent from the wheel users get from ``pip install .``.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_folder_is_listed_and_every_listed_package_exists():
    setuptools = _pyproject()["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages without a folder: {sorted(listed - found)}"


def test_no_module_sits_in_a_folder_without_init():
    """A ``.py`` file in a folder without ``__init__.py`` would be left out of the wheel silently."""
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    orphans = [
        str(py.relative_to(ROOT))
        for folder in set(mapping.values())
        for py in (ROOT / folder).rglob("*.py")
        if not (py.parent / "__init__.py").is_file()
    ]
    assert orphans == []
