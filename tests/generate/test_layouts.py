"""The generated folder read by the tools it is laid out for, each as the oracle of its own format:
nnU-Net v2's dataset integrity check on ``generate --layout nnunet`` (imagesTr/ + labelsTr/ +
dataset.json), MONAI's ``LoadImaged`` over the MSD-style ``training`` list of the default layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _shared import small_config

from lad_fast.generate.writer import IDENTITY, VolumeWriter, volume_id

SETTINGS = {k: f"v-{k}" for k in IDENTITY}
AFFINE = np.array(  # a tilted, shifted grid: geometry must survive both readers, not only the identity
    [[0.0, 0.0, 4.6, -80.0], [0.0, 6.4, 0.0, 12.5], [-6.4, 0.0, 0.0, 300.0], [0.0, 0.0, 0.0, 1.0]]
)


def _volume(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) = (5, 7, 6) HU and a mask holding background, several organs and the last id (11)."""
    rng = np.random.default_rng(i)
    hu = rng.integers(-1000, 1500, size=(5, 7, 6)).astype(np.float32)
    mask = np.zeros((5, 7, 6), np.uint8)
    mask[1:4, 2:5, 1:3] = 1 + i
    mask[0, 0, :] = 11
    return hu, mask


def _dataset(out: Path, layout: str, n: int = 3) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    w = VolumeWriter(out, SETTINGS, layout=layout)
    w.prepare(force=False)
    volumes = {i: _volume(i) for i in range(n)}
    for i, (hu, mask) in volumes.items():
        w.write(i, hu, mask, AFFINE, {"seed": i, **SETTINGS})
    assert w.finalize() == n
    return volumes


@pytest.fixture
def verify(monkeypatch, tmp_path):
    """nnU-Net v2's own ``verify_dataset_integrity(folder, num_processes)`` (its paths set, so it does not
    warn about them)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    return lambda folder: verify_dataset_integrity(str(folder), num_processes=1)


def test_nnunet_layout_passes_nnunets_own_integrity_check(tmp_path, verify, capsys):
    out = tmp_path / "Dataset501_LadSynthetic"
    _dataset(out, "nnunet")
    verify(out)  # raises (AssertionError / RuntimeError) on any problem
    assert "verify_dataset_integrity Done" in capsys.readouterr().out
    ds = json.loads((out / "dataset.json").read_text())
    assert {k: ds[k] for k in ("channel_names", "numTraining", "file_ending")} == {
        "channel_names": {"0": "CT"}, "numTraining": 3, "file_ending": ".nii.gz"
    }  # fmt: skip
    # the oracle can fail: a label missing, then a count that does not match
    (out / "labelsTr" / f"{volume_id(2)}.nii.gz").unlink()
    with pytest.raises(AssertionError, match="not all training cases have a label file"):
        verify(out)
    (out / "imagesTr" / f"{volume_id(2)}_0000.nii.gz").unlink()
    with pytest.raises(AssertionError, match="Did not find the expected number of training cases"):
        verify(out)


def test_the_default_layout_is_not_an_nnunet_dataset(tmp_path, verify):
    out = tmp_path / "Dataset502_Default"
    _dataset(out, "default", n=1)
    with pytest.raises(AssertionError, match="There needs to be a imagesTr subfolder"):
        verify(out)


@pytest.mark.parametrize("layout", ["default", "nnunet"])
def test_monai_loads_every_pair_of_the_training_list(tmp_path, layout):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    out = tmp_path / "o"
    volumes = _dataset(out, layout)
    pairs = load_decathlon_datalist(str(out / "dataset.json"), data_list_key="training", base_dir=str(out))
    assert [Path(p["image"]).relative_to(out).as_posix() for p in pairs] == [
        f"images/{volume_id(i)}.nii.gz" for i in range(3)
    ]
    load = LoadImaged(keys=["image", "label"], image_only=True)
    for i, pair in enumerate(pairs):
        loaded = load(pair)
        hu, mask = volumes[i]
        # MONAI gives NIfTI's (x, y, z) order: W, H, D of lad-fast's (D, H, W) arrays
        np.testing.assert_array_equal(np.asarray(loaded["image"]).transpose(2, 1, 0), np.round(hu))
        np.testing.assert_array_equal(np.asarray(loaded["label"]).transpose(2, 1, 0), mask)
        written = nib.load(pair["image"]).affine  # the file's own grid, as nibabel reads it
        for key in ("image", "label"):
            np.testing.assert_allclose(np.asarray(loaded[key].affine), written, atol=1e-5)


@pytest.mark.slow  # trains a tiny run for a few seconds, then samples two volumes
def test_generate_layout_nnunet_from_the_cli_is_an_nnunet_dataset(tmp_path, tiny_phantoms, verify, capsys):
    from lad_fast.cli.app import main
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    run = tmp_path / "run"
    cfg = small_config(diffusion_steps=2)
    train_vqgan(run, cfg, data=tiny_phantoms, device="cpu")
    train_diffusion(run, cfg, data=tiny_phantoms, device="cpu")
    out = tmp_path / "Dataset503_Generated"
    args = ["generate", "--run", str(run), "--out", str(out), "--n", "2", "--augment", "1"]
    args += ["--sampler", "ddim", "--steps", "2", "--device", "cpu", "--layout", "nnunet"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{volume_id(i)}.nii.gz" for i in (0, 1)]
    verify(out)
    assert "verify_dataset_integrity Done" in capsys.readouterr().out
