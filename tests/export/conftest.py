"""Fixtures of the export tests: one tiny trained run per session and its ONNX export (fp32 and fp16)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _shared import small_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_phantoms) -> Path:
    """A run with a VQ-GAN and a diffusion model trained for two steps on three tiny phantoms. Read-only:
    tests that change its export folder use :func:`run_copy`."""
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    path = tmp_path_factory.mktemp("export-runs") / "r"
    cfg = small_config(diffusion_steps=2)
    train_vqgan(path, cfg, data=tiny_phantoms, device="cpu")
    train_diffusion(path, cfg, data=tiny_phantoms, device="cpu")
    return path


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run (its checkpoints, without any export)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("export"))
    return dst


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory) -> Path:
    """``lad-fast export`` of the tiny run in fp32 and fp16 (ModelOpt AutoCast) into a folder of its own."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt.onnx.autocast")
    from lad_fast.export.run_export import export_run

    out = tmp_path_factory.mktemp("exported") / "out"
    export_run(tiny_run, out, target="onnx", precision="fp16")
    return out
