"""``lad-fast evaluate`` end to end on tiny phantoms, and its bad-input errors."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lad_fast.cli.app import main
from lad_fast.config import SegmenterConfig, get_preset

N_REAL = 4


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """A prepared dataset of four tiny phantoms (the real side)."""
    from lad_fast.data.cache import phantom_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        return phantom_dataset("tiny", n=N_REAL, seed=5)


@pytest.fixture(scope="module")
def seg_run(real, tmp_path_factory) -> Path:
    """A run with a (barely) trained tiny segmenter."""
    from lad_fast.train.segmenter import train_segmenter

    cfg = get_preset("tiny")
    cfg = replace(
        cfg,
        segmenter=SegmenterConfig(channels=(8, 16), groups=4),
        segmenter_train=replace(cfg.segmenter_train, steps=2, batch_size=2, checkpoint_every=100),
    )
    run = tmp_path_factory.mktemp("runs") / "seg"
    train_segmenter(run, cfg, data=real, device="cpu")
    return run


def write_synthetic(out: Path, real: Path, run: Path | None, n: int = 3, masks: bool = True) -> Path:
    """A folder laid out like `lad-fast generate` output: the real phantoms with noise as 'generated'
    volumes, their masks as conditioning masks, and a manifest naming ``run``."""
    from lad_fast.data.geometry import dhw_to_nifti, unit_to_hu
    from lad_fast.data.io import write_nifti
    from lad_fast.data.prepared import PreparedDataset

    ds = PreparedDataset(real)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        item = ds[i % len(ds)]
        vid = f"lad_{i:06d}"
        hu = unit_to_hu(np.asarray(item["image"], dtype=np.float32), ds.geometry.hu_window)
        hu = hu + rng.normal(0, 20, hu.shape).astype(np.float32)
        write_nifti(out / "images" / f"{vid}.nii.gz", *dhw_to_nifti(hu, item["affine"]), kind="image")
        if masks:
            write_nifti(
                out / "masks" / f"{vid}.nii.gz",
                *dhw_to_nifti(np.asarray(item["mask"]), item["affine"]),
                kind="labels",
            )
        line = {"id": vid, "index": i, "source_case": item["id"]}
        if run is not None:
            line["run"] = str(run.resolve())
        lines.append(json.dumps(line) + "\n")
    (out / "manifest.jsonl").write_text("".join(lines))
    from lad_fast.generate.writer import dataset_json

    (out / "dataset.json").write_text(json.dumps(dataset_json([json.loads(x) for x in lines], "test")))
    return out


@pytest.fixture(scope="module")
def synthetic(real, seg_run, tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("gen") / "generated", real, seg_run)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(["evaluate", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_prints_the_table_and_writes_json_and_png(real, synthetic, seg_run, tmp_path, capsys):
    from lad_fast.runs.loading import checkpoint_hash

    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    code, stdout, err = run_cli(
        [
            "--real",
            str(real),
            "--synthetic",
            str(synthetic),
            "--out",
            str(out),
            "--png",
            str(png),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    for text in (
        "FID",
        "MMD linear",
        "MMD gaussian",
        "real vs real",
        "trivial",
        "diversity",
        "shuffled",
        "real ceiling",
        "structure L1",
        "HU real",
        "liver",
    ):
        assert text in stdout, text
    rep = json.loads(out.read_text())
    assert rep["real"]["volumes"] == N_REAL and rep["synthetic"]["volumes"] == 3
    assert rep["features"]["extractor"] == "segmenter" and len(rep["features"]["weights_hash"]) == 16
    assert rep["segmenter"]["checkpoint_hash"] == checkpoint_hash(seg_run / "segmenter")
    assert rep["versions"]["lad_fast"]
    assert rep["command"].startswith("lad-fast")
    for block in (rep["realism"], rep["references"]["real_vs_real"], rep["references"]["trivial"]):
        assert (
            np.isfinite(block["fid"])
            and np.isfinite(block["mmd_linear"])
            and np.isfinite(block["mmd_gaussian"])
        )
    assert rep["references"]["real_vs_real"]["volumes"] == [2, 2]
    assert 0 < rep["diversity"]["synthetic"] <= 1 and rep["diversity"]["ms_ssim"]["kernel_size"] == [
        3,
        11,
        11,
    ]
    fid = rep["fidelity"]
    assert "liver" in fid["organs"] and set(fid) >= {"synthetic", "shuffled", "real", "derangement"}
    assert all(fid["derangement"][i] != i for i in range(3))
    assert fid["real"]["cases"] == N_REAL and fid["synthetic"]["structure_l1"] is not None
    assert (
        rep["intensity"]["real_masks"] == "labels" and rep["intensity"]["synthetic_masks"] == "conditioning"
    )
    assert rep["intensity"]["real"]["liver"]["voxels"] > 0
    from PIL import Image

    assert Image.open(png).size == (1280, 520)
    # the fidelity-only entry point (bench/condition_fidelity.py) reports the same numbers
    from lad_fast.evaluate.report import synthetic_fidelity

    alone = synthetic_fidelity(synthetic, device="cpu")
    assert alone["synthetic"] == fid["synthetic"] and alone["shuffled"] == fid["shuffled"]
    assert alone["segmenter"] == rep["segmenter"] and alone["volumes"] == 3


def test_the_segmenter_run_that_generated_the_volumes_is_opened_once(synthetic, seg_run, monkeypatch):
    from lad_fast.evaluate.report import synthetic_fidelity
    from lad_fast.runs.rundir import RunDir

    opened, parsed = [], []
    real_open, real_raw = RunDir.open.__func__, RunDir._raw_config

    def counting_open(cls, path):
        opened.append(Path(path))
        return real_open(cls, path)

    def counting_raw(self):
        parsed.append(self.path)
        return real_raw(self)

    monkeypatch.setattr(RunDir, "open", classmethod(counting_open))
    monkeypatch.setattr(RunDir, "_raw_config", counting_raw)
    synthetic_fidelity(synthetic, device="cpu")
    # the manifest names seg_run: its segmenter, window and conditions come from one opening
    assert [p.resolve() for p in opened] == [seg_run.resolve()] and len(parsed) == 1


def test_the_synthetic_scores_follow_their_masks_better_than_shuffled(real, synthetic):
    """The fake 'generated' volumes are real phantoms with noise, so their conditioning masks are the
    truth: an oracle segmenter scores Dice 1 against them and less against the shuffled masks."""
    from lad_fast.evaluate.report import evaluate
    from lad_fast.runs import loading

    truth: dict[bytes, np.ndarray] = {}
    from lad_fast.data.prepared import PreparedDataset

    ds = PreparedDataset(real)
    for i in range(len(ds)):
        truth[np.asarray(ds[i]["mask"]).tobytes()] = np.asarray(ds[i]["mask"])
    # the segmenter is replaced by one that returns the mask of the nearest real case (by image L1)
    images = np.stack([np.asarray(ds[i]["image"], dtype=np.float32) for i in range(len(ds))])
    masks = np.stack([np.asarray(ds[i]["mask"]) for i in range(len(ds))])

    def oracle(net, x, device):
        return np.stack([masks[np.abs(images - v).mean(axis=(1, 2, 3)).argmin()] for v in x])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "predict_volumes", oracle)
        rep = evaluate(real, synthetic, device="cpu")
    fid = rep["fidelity"]
    assert fid["synthetic"]["mean_dice"] == 1.0 and fid["real"]["mean_dice"] == 1.0
    assert fid["synthetic"]["structure_l1"] == 0.0
    assert fid["shuffled"]["mean_dice"] < 0.99 and fid["shuffled"]["structure_l1"] > 0


# ------------------------------------------------------------------------------------------ bad input


def _assert_refused(code: int, err: str, pattern: str, *paths: Path) -> None:
    import re

    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lad-fast: error:"), err
    assert re.search(pattern, lines[0]), lines[0]
    for p in paths:
        assert not p.exists(), p


def test_fewer_than_two_volumes_on_a_side_is_refused(real, seg_run, tmp_path, capsys):
    one = write_synthetic(tmp_path / "one", real, seg_run, n=1)
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    code, _, err = run_cli(
        ["--real", str(real), "--synthetic", str(one), "--out", str(out), "--png", str(png)], capsys
    )
    _assert_refused(
        code, err, r"1 synthetic volume\(s\); FID and MMD are undefined with fewer than 2", out, png
    )


def test_a_synthetic_folder_without_masks_is_refused_when_fidelity_is_asked(real, seg_run, tmp_path, capsys):
    bare = write_synthetic(tmp_path / "bare", real, seg_run, masks=False)
    out = tmp_path / "e.json"
    code, _, err = run_cli(["--real", str(real), "--synthetic", str(bare), "--out", str(out)], capsys)
    _assert_refused(code, err, r"3 of 3 volumes have no masks/lad_000000.nii.gz.*--no-fidelity", out)


def test_without_masks_and_no_fidelity_the_rest_is_evaluated(real, seg_run, tmp_path, capsys):
    bare = write_synthetic(tmp_path / "bare", real, seg_run, masks=False)
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        [
            "--real",
            str(real),
            "--synthetic",
            str(bare),
            "--out",
            str(out),
            "--no-fidelity",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert "synthetic" not in rep["fidelity"] and rep["intensity"]["synthetic_masks"] == "segmenter"


def test_a_real_volume_that_cannot_be_resampled_is_refused(real, synthetic, tmp_path, capsys):
    from lad_fast.data.io import write_nifti

    folder = tmp_path / "real_nifti"
    for i in range(2):  # 4 x 4 x 4 voxels of 1 mm: far below half the tiny field of view
        write_nifti(folder / f"small_{i}.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4), kind="image")
    out = tmp_path / "e.json"
    code, _, err = run_cli(["--real", str(folder), "--synthetic", str(synthetic), "--out", str(out)], capsys)
    _assert_refused(
        code, err, r"small_0 cannot be resampled onto the synthetic grid .*too small along axis", out
    )


def test_synthetic_volumes_on_different_grids_are_refused(real, seg_run, tmp_path, capsys):
    from lad_fast.data.io import write_nifti

    gen = write_synthetic(tmp_path / "mixed", real, seg_run)
    write_nifti(
        gen / "images" / "lad_000001.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4), kind="image"
    )
    code, _, err = run_cli(["--real", str(real), "--synthetic", str(gen)], capsys)
    _assert_refused(code, err, r"lad_000001 has shape \(8, 8, 8\).*evaluate volumes generated on one grid")


def test_medicalnet_weights_with_the_wrong_key_layout_are_refused(real, synthetic, tmp_path, capsys):
    from lad_fast.evaluate.nets.medicalnet import MedicalNet

    # the official ResNet-10 layout with the stem renamed (a re-exported or foreign checkpoint)
    sd = {
        f"module.{k}".replace("module.conv1.", "module.stem."): v
        for k, v in MedicalNet(10).state_dict().items()
    }
    weights = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": sd}, weights)
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        [
            "--real",
            str(real),
            "--synthetic",
            str(synthetic),
            "--features",
            "medicalnet",
            "--weights",
            str(weights),
            "--out",
            str(out),
        ],
        capsys,
    )
    _assert_refused(
        code,
        err,
        r"first missing key 'module\.conv1\.weight', first unexpected key 'module\.stem\.weight'",
        out,
    )


def test_nan_features_are_refused(real, synthetic, tmp_path, capsys):
    from lad_fast.evaluate.nets.medicalnet import MedicalNet

    net = MedicalNet(10)
    sd = {
        f"module.{k}": torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }
    weights = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": sd}, weights)
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        [
            "--real",
            str(real),
            "--synthetic",
            str(synthetic),
            "--features",
            "medicalnet",
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capsys,
    )
    _assert_refused(code, err, r"medicalnet-resnet10 features of 4 real volume\(s\) are not finite", out)


def test_without_a_segmenter_the_error_names_the_training_command(real, tmp_path, capsys):
    from lad_fast.runs.rundir import RunDir

    run = tmp_path / "no_seg"
    RunDir.create(run, get_preset("tiny"))
    gen = write_synthetic(tmp_path / "gen", real, run)
    code, _, err = run_cli(["--real", str(real), "--synthetic", str(gen)], capsys)
    _assert_refused(code, err, rf"holds no segmenter; train one with `lad-fast train segmenter --run {run}`")


def test_an_existing_output_is_not_overwritten_without_force(real, synthetic, tmp_path, capsys):
    out = tmp_path / "e.json"
    out.write_text("keep")
    code, _, err = run_cli(["--real", str(real), "--synthetic", str(synthetic), "--out", str(out)], capsys)
    assert code == 2 and "pass --force" in err and out.read_text() == "keep"


def test_a_nifti_folder_is_read_as_real_and_resampled_onto_the_synthetic_grid(
    real, seg_run, synthetic, tmp_path
):
    """A NIfTI folder in the generate layout at another spacing: resampled and cropped like prepare."""
    import nibabel as nib

    from lad_fast.evaluate.report import evaluate

    folder = write_synthetic(tmp_path / "nifti_real", real, None, n=4)
    for sub in ("images", "masks"):  # the same volumes at 4x finer in-plane spacing: 4x4 voxels per voxel
        for f in (folder / sub).iterdir():
            img = nib.load(str(f))
            data = np.repeat(np.repeat(np.asarray(img.dataobj), 4, axis=0), 4, axis=1)
            aff = img.affine.copy()
            aff[:3, :2] /= 4
            aff[:3, 3] -= 1.5 * img.affine[:3, 0] / 4 + 1.5 * img.affine[:3, 1] / 4  # keep the centre
            nib.save(nib.Nifti1Image(data, aff), str(f))
    rep = evaluate(folder, synthetic, device="cpu")
    assert rep["real"] == {"source": str(folder), "volumes": 4, "labelled": 4}
    # back on the tiny grid, the labels match the prepared ones closely
    from lad_fast.evaluate.datasets import read_real

    back = read_real(folder, ((16, 64, 64), (4.6, 6.4, 6.4)), (-1000.0, 400.0))
    from lad_fast.data.prepared import PreparedDataset

    ds = PreparedDataset(real)
    agree = np.mean([np.mean(back.masks[i] == np.asarray(ds[i]["mask"])) for i in range(4)])
    assert agree > 0.99


def test_real_masks_without_canonical_labels_are_refused(real, synthetic, tmp_path, capsys):
    folder = write_synthetic(tmp_path / "nifti_real", real, None, n=2)
    (folder / "dataset.json").unlink()
    code, _, err = run_cli(["--real", str(folder), "--synthetic", str(synthetic)], capsys)
    _assert_refused(
        code, err, r"masks/ without a dataset.json listing lad-fast's canonical labels.*lad-fast prepare"
    )


def test_a_manifest_without_its_run_needs_segmenter(real, tmp_path, capsys):
    gen = write_synthetic(tmp_path / "gen", real, None)
    code, _, err = run_cli(["--real", str(real), "--synthetic", str(gen)], capsys)
    _assert_refused(code, err, r"manifest names no single run that made it; pass --segmenter RUN")


def test_segmenter_option_overrides_the_manifest(real, seg_run, tmp_path, capsys):
    gen = write_synthetic(tmp_path / "gen", real, None)
    out = tmp_path / "e.json"
    code, _, err = run_cli(
        ["--real", str(real), "--synthetic", str(gen), "--segmenter", str(seg_run), "--out", str(out),
         "--device", "cpu"], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out.read_text())["segmenter"]["run"] == str(seg_run)


@pytest.mark.parametrize("features", ["medicalnet", "radimagenet-2.5d"])
def test_pretrained_features_without_weights_say_where_to_get_them(
    real, synthetic, tmp_path, capsys, features
):
    out = tmp_path / "e.json"
    code, _, err = run_cli(["--real", str(real), "--synthetic", str(synthetic), "--features", features,
                            "--out", str(out)], capsys)  # fmt: skip
    _assert_refused(code, err, rf"the {features} feature extractor needs a weights file.*--weights", out)


def _no_computation(monkeypatch) -> None:
    import lad_fast.evaluate.report as report

    def fail(*args, **kwargs):
        raise AssertionError("evaluate computed before checking its outputs")

    monkeypatch.setattr(report, "evaluate", fail)


@pytest.mark.parametrize("option", ["--out", "--png"])
def test_an_output_under_a_file_is_one_line_before_computing(tmp_path, capsys, monkeypatch, option):
    _no_computation(monkeypatch)
    (tmp_path / "FILE").write_text("keep")
    target = tmp_path / "FILE" / "x.json"
    code, _, err = run_cli(
        ["--real", str(tmp_path), "--synthetic", str(tmp_path), option, str(target)], capsys
    )
    _assert_refused(code, err, rf"{tmp_path / 'FILE'} is a file, not a folder; name a file in a folder")
    assert (tmp_path / "FILE").read_text() == "keep"


def test_an_unwritable_output_folder_is_one_line_before_computing(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    _no_computation(monkeypatch)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "new" / "e.json"
    code, _, err = run_cli(["--real", str(tmp_path), "--synthetic", str(tmp_path), "--out", str(out)], capsys)
    _assert_refused(
        code, err, rf"e.json: cannot write in {tmp_path} \(Read-only file system\)", tmp_path / "new"
    )


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from lad_fast.cli.evaluate_cmd import _check_output

    _check_output(tmp_path / "a" / "b" / "e.json", force=False)
    assert list(tmp_path.iterdir()) == []
