"""SIGINT / SIGTERM during ``generate``: the volume being written is finished, the rest dropped, no partial
file; the message says how many are done; the rerun completes the set."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from _shared import small_config

from lad_fast.generate.generate import generate, volume_id
from lad_fast.utils.interrupts import Interrupted

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
FAST = {"sampler": "ddim", "steps": 2, "guidance": 2.0, "device": "cpu"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_phantoms) -> Path:
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    path = tmp_path_factory.mktemp("runs") / "r"
    cfg = small_config(diffusion_steps=2)
    train_vqgan(path, cfg, data=tiny_phantoms, device="cpu")
    train_diffusion(path, cfg, data=tiny_phantoms, device="cpu")
    return path


def _images(out: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((out / "images").iterdir())}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_volume_in_flight_then_rerun_completes(run, tmp_path, monkeypatch, sig, capsys):
    from lad_fast.generate.writer import VolumeWriter

    out, real, written = tmp_path / "out", VolumeWriter.write, []

    def signalled_while_writing(self, i, *args, **kwargs):
        if not written:
            os.kill(os.getpid(), sig)  # arrives while the first volume of a batch of two is written
        real(self, i, *args, **kwargs)
        written.append(volume_id(i))

    monkeypatch.setattr(VolumeWriter, "write", signalled_while_writing)
    with pytest.raises(Interrupted) as err:
        generate(run, out, n=5, augment=0, batch=2, seed=1, **FAST)
    assert err.value.exit_code == 128 + sig and err.value.resume_flag == ""
    name = signal.Signals(sig).name
    assert str(err.value) == (
        f"interrupted ({name}): 1 of 5 volumes done in {out}, the rerun makes the other 4; no partial file; "
        "to continue, rerun it"
    )
    assert f"{name} received, stopping after the volume being written" in capsys.readouterr().err
    # the first volume was finished, its batch mate (already sampled) dropped; nothing partial or hidden
    assert written == ["lad_000000"]
    assert sorted(os.listdir(out / "images")) == ["lad_000000.nii.gz"]
    assert sorted(os.listdir(out / "masks")) == ["lad_000000.nii.gz"]
    assert not (out / "dataset.json").exists()

    monkeypatch.setattr(VolumeWriter, "write", real)
    generate(run, out, n=5, augment=0, batch=2, seed=1, **FAST)
    full = tmp_path / "full"
    generate(run, full, n=5, augment=0, batch=2, seed=1, **FAST)
    got, want = _images(out), _images(full)
    assert got.keys() == want.keys() and len(got) == 5
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert (out / "dataset.json").is_file()


def test_cli_prints_how_many_and_the_command_to_continue(monkeypatch, capsys, tmp_path):
    import lad_fast.generate.generate as gen_module
    from lad_fast.cli.app import main

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGTERM, "3 of 8 volumes done in out, the rerun makes the other 5", "")

    monkeypatch.setattr(gen_module, "generate", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--run", str(tmp_path), "--out", "out", "--n", "8", "--force"])
    assert exit_.value.code == 143
    assert capsys.readouterr().err == (
        "lad-fast: interrupted (SIGTERM): 3 of 8 volumes done in out, the rerun makes the other 5; "
        f"to continue: lad-fast generate --run {tmp_path} --out out --n 8\n"
    )
