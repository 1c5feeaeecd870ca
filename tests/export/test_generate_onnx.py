"""``generate --backend onnx`` uses the run's exported graph (exported on demand, then reused) and writes the
volumes ``--backend torch`` writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# ONNX Runtime and PyTorch order float sums differently (about 1e-6 relative per step); over the sampler's
# steps and the decoder that stays far below one HU step of int16 output, except where a value sits on a
# rounding edge: 1 HU. Measured on this run: max 0 HU, so 1 HU is the stated tolerance.
HU_TOL = 1
SETTINGS = {"n": 2, "sampler": "ddim", "steps": 3, "guidance": 2.0, "augment": 1, "batch": 2, "seed": 5}


def _images(out):
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((out / "images").glob("*.nii.gz"))}


def test_onnx_backend_writes_the_torch_volumes_and_reuses_its_export(run_copy, tmp_path):
    from lad_fast.generate.generate import generate, read_manifest
    from lad_fast.runs.loading import checkpoint_hash

    generate(run_copy, tmp_path / "torch", backend="torch", device="cpu", **SETTINGS)
    generate(run_copy, tmp_path / "onnx", backend="onnx", device="cpu", **SETTINGS)
    a, b = _images(tmp_path / "torch"), _images(tmp_path / "onnx")
    assert a.keys() == b.keys() and len(a) == 2
    worst = max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a)
    assert worst <= HU_TOL, f"onnx and torch volumes differ by {worst} HU"
    assert {r["backend"] for r in read_manifest(tmp_path / "onnx").values()} == {"onnx"}

    # exported on demand into RUN/export, with its metadata, and reused by the next generate
    art = run_copy / "export" / "denoiser.fp32.onnx"
    meta = json.loads(art.with_name(art.name + ".json").read_text())
    assert meta["checkpoint"] == checkpoint_hash(run_copy / "diffusion") and meta["target"] == "onnx"
    assert meta["verified"]["relative_error"] <= 1e-4
    stamp = art.stat().st_mtime_ns
    generate(run_copy, tmp_path / "again", backend="onnx", device="cpu", **{**SETTINGS, "n": 1})
    assert art.stat().st_mtime_ns == stamp
    # the decoder is exported and used too (every volume here is decoded whole)
    dec = art.with_name("decoder.fp32.onnx")
    assert json.loads(dec.with_name(dec.name + ".json").read_text())["checkpoint"] == checkpoint_hash(
        run_copy / "vqgan"
    )
    assert sorted(p.name for p in art.parent.iterdir()) == [
        "decoder.fp32.onnx",
        "decoder.fp32.onnx.json",
        "denoiser.fp32.onnx",
        "denoiser.fp32.onnx.json",
    ]


def test_onnx_backend_decodes_through_the_exported_decoder(run_copy, tmp_path, monkeypatch):
    """The decoder artefact, not the VQ-GAN module, decodes whole volumes under --backend onnx."""
    import lad_fast.export.backends as backends
    from lad_fast.generate.generate import generate

    calls = []
    real = backends.make_decoder

    def counting(*args, **kwargs):
        decode = real(*args, **kwargs)
        return lambda x: calls.append(tuple(x.shape)) or decode(x)

    monkeypatch.setattr(backends, "make_decoder", counting)
    generate(run_copy, tmp_path / "o", backend="onnx", device="cpu", **SETTINGS)
    assert len(calls) == SETTINGS["n"] and all(c[0] == 1 for c in calls)  # one volume at a time
    calls.clear()
    generate(run_copy, tmp_path / "t", backend="onnx", device="cpu", decode_tile=2, **SETTINGS)
    assert calls == []  # tiles decode through the module


def test_two_process_torchrun_exports_once_on_rank_zero(run_copy, tmp_path):
    """Without an export, rank 0 exports on demand while rank 1 waits, then both load the same graph."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys\nfrom lad_fast.generate.generate import generate\n"
        "generate(sys.argv[1], sys.argv[2], n=2, augment=0, batch=1, seed=1, sampler='ddim', steps=2, "
        "backend='onnx', device='cpu')\n"
    )
    out = tmp_path / "dist"
    env = {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port), str(worker), str(run_copy), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["index"], r["rank"], r["backend"]) for r in lines] == [(0, 0, "onnx"), (1, 1, "onnx")]
    assert sorted(p.name for p in (run_copy / "export").iterdir()) == [
        "decoder.fp32.onnx",
        "decoder.fp32.onnx.json",
        "denoiser.fp32.onnx",
        "denoiser.fp32.onnx.json",
    ]


def test_onnx_decoder_backend_equals_the_torch_decode(run_copy):
    """make_decoder: the run's decoder graph, exported on demand, decodes as Generator.decode does after
    the latent de-normalisation (one volume at a time there)."""
    import torch

    from lad_fast.export.backends import make_decoder
    from lad_fast.generate.generate import load_generator

    gen = load_generator(run_copy, torch.device("cpu"))
    latent = torch.rand(3, *gen.latent_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vq = gen.vq
    with torch.no_grad():
        want = torch.cat([vq.decode(vq.quantize(vq.from_unit(u[None].clamp(-1, 1))))[:, 0] for u in latent])
    onnx_dec = make_decoder("onnx", gen.vq, run_copy, batch=3)
    got = onnx_dec(latent)[:, 0]
    from lad_fast.export.onnx import relative_error

    assert relative_error(want, got) <= 1e-4
    meta = json.loads((run_copy / "export" / "decoder.fp32.onnx.json").read_text())
    from lad_fast.runs.loading import checkpoint_hash

    assert meta["checkpoint"] == checkpoint_hash(run_copy / "vqgan") and meta["kind"] == "decoder"
    torch_dec = make_decoder("torch", gen.vq, run_copy)
    got = torch.cat([torch_dec(u[None])[:, 0] for u in latent])  # one at a time, as the reference
    torch.testing.assert_close(got, want, rtol=0, atol=0)
