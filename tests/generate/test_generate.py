"""``generate``: the generated-dataset format, batch-invariant seeds, resume, bad input, torchrun shards."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _shared import small_config as shared_small_config

from lad_fast.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    LadFastError,
    OutputExistsError,
)
from lad_fast.generate.generate import (
    MANIFEST,
    augmented_mask,
    generate,
    load_source_masks,
    read_manifest,
    volume_id,
)

FAST = {"sampler": "ddim", "steps": 3, "guidance": 2.0, "device": "cpu"}


def small_config():
    return shared_small_config(diffusion_steps=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_phantoms) -> Path:
    """A run with a VQ-GAN and a diffusion model trained for two steps on three tiny phantoms."""
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    data = tiny_phantoms
    path = tmp_path_factory.mktemp("runs") / "r"
    cfg = small_config()
    train_vqgan(path, cfg, data=data, device="cpu")
    train_diffusion(path, cfg, data=data, device="cpu")
    return path


@pytest.fixture(scope="module")
def made(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "out"
    generate(run, out, n=5, augment=2, batch=2, seed=1, **FAST)
    return out


def test_generated_dataset_format(made, run):
    from lad_fast.runs.loading import load_diffusion

    lines = [json.loads(x) for x in (made / MANIFEST).read_text().splitlines()]
    assert [r["id"] for r in lines] == [volume_id(i) for i in range(5)]
    meta = load_diffusion(run)[1]
    data = Path(meta["data"])
    sources = load_source_masks(data, "tiny", (16, 64, 64))
    for r in lines:
        assert r["sampler"] == "ddim" and r["steps"] == 3 and r["guidance"] == 2.0 and r["backend"] == "torch"
        assert r["eta"] == 0.0  # not given: DDIM's deterministic default
        assert (
            r["diffusion_checkpoint"] == meta["checkpoint_hash"]
            and r["vqgan_checkpoint"] == meta["vqgan_hash"]
        )
        i = r["index"]
        src = sources[i % 3]
        assert r["source_case"] == src.case and r["augmentation"]["index"] == (i // 3) % 2
        image = nib.load(str(made / "images" / f"{r['id']}.nii.gz"))
        mask = nib.load(str(made / "masks" / f"{r['id']}.nii.gz"))
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert image.shape == mask.shape == (64, 64, 16)  # (W, H, D) in the file: RAS-oriented
        np.testing.assert_allclose(image.header.get_zooms(), (6.4, 6.4, 4.6), rtol=1e-6)
        np.testing.assert_allclose(image.affine, src.affine[:, [2, 1, 0, 3]])
        hu = np.asarray(image.dataobj)
        assert -1000 <= hu.min() and hu.max() <= 400
        # the paired mask is the augmented mask whose conditions produced the image
        expect, record = augmented_mask(src, i % 3, (i // 3) % 2, 1, small_config())
        np.testing.assert_array_equal(np.asarray(mask.dataobj).transpose(2, 1, 0), expect)
        assert record["rotate_deg"] == r["augmentation"]["rotate_deg"]
    ds = json.loads((made / "dataset.json").read_text())
    assert ds["numTraining"] == 5 and ds["file_ending"] == ".nii.gz" and ds["channel_names"] == {"0": "CT"}
    assert ds["labels"]["background"] == 0 and ds["labels"]["pancreas"] == 5
    assert ds["training"][0] == {"image": "./images/lad_000000.nii.gz", "label": "./masks/lad_000000.nii.gz"}
    assert not [p for p in made.rglob(".*")]  # no temporaries left


def test_augmented_mask_is_result_k_of_augment_many(run):
    from lad_fast.conditioning.augment import augment_many
    from lad_fast.runs.loading import load_diffusion

    cfg = small_config()
    src = load_source_masks(Path(load_diffusion(run)[1]["data"]), "tiny", (16, 64, 64))[1]
    mask, record = augmented_mask(src, 1, 2, 9, cfg)
    ref = augment_many(src.mask, cfg.geometry.spacing, cfg.augment, record["seed"], 3)[2]
    np.testing.assert_array_equal(mask, ref[0])
    assert record == ref[1]


def _images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted((out / "images").iterdir())}


def test_one_seed_gives_the_same_volume_whatever_the_batch(run, tmp_path):
    generate(run, tmp_path / "b1", n=4, augment=0, batch=1, seed=5, **FAST)
    generate(run, tmp_path / "b4", n=4, augment=0, batch=4, seed=5, **FAST)
    a, b = _images(tmp_path / "b1"), _images(tmp_path / "b4")
    assert a.keys() == b.keys() and len(a) == 4
    # The batched U-Net forward may round differently per batch size; after int16 HU rounding we accept
    # at most 1 HU anywhere (measured: bitwise equal on this CPU build).
    worst = max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a)
    assert worst <= 1
    assert not np.array_equal(a["lad_000000.nii.gz"], a["lad_000001.nii.gz"])  # seeds differ per volume


def test_rerun_of_an_interrupted_generate_completes_the_set(run, made, tmp_path, monkeypatch):
    from lad_fast.generate.writer import VolumeWriter

    out = tmp_path / "out"
    real, written = VolumeWriter.write, []

    def dies_after_two(self, i, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        real(self, i, *args, **kwargs)
        written.append(volume_id(i))

    monkeypatch.setattr(VolumeWriter, "write", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(run, out, n=5, augment=2, batch=2, seed=1, **FAST)
    assert written == ["lad_000000", "lad_000001"] and not (out / "dataset.json").exists()
    with open(out / MANIFEST, "a") as f:
        f.write('{"id": "lad_0000')  # a line torn by the kill
    monkeypatch.setattr(
        VolumeWriter, "write", lambda self, i, *a, **k: written.append(volume_id(i)) or real(self, i, *a, **k)
    )
    generate(run, out, n=5, augment=2, batch=2, seed=1, **FAST)
    assert written[2:] == ["lad_000002", "lad_000003", "lad_000004"]  # only the missing ones
    lines = [json.loads(x) for x in (out / MANIFEST).read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(out / "images")) == [f"{volume_id(i)}.nii.gz" for i in range(5)]
    # and the resumed set equals the uninterrupted one
    assert all(np.array_equal(_images(out)[k], v) for k, v in _images(made).items())


def test_bad_arguments_are_refused_before_any_file(run, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="--guidance must be >= 0"):
        generate(run, out, n=2, guidance=-1.0, device="cpu")
    with pytest.raises(ConfigError, match="--n must be at least 1, got 0"):
        generate(run, out, n=0, device="cpu")
    with pytest.raises(ConfigError, match=r"--steps 21 is outside 1\.\.20"):
        generate(run, out, n=2, sampler="ddim", steps=21, device="cpu")
    with pytest.raises(ConfigError, match="unknown sampler 'rk4'"):
        generate(run, out, n=2, sampler="rk4", device="cpu")
    with pytest.raises(
        ConfigError, match="sampler 'euler' does not fit .* objective 'ddpm'; use --sampler ddpm"
    ):
        generate(run, out, n=2, sampler="euler", device="cpu")
    with pytest.raises(BackendUnavailableError, match="--backend trt: TensorRT is not installed"):
        generate(run, out, n=2, backend="trt", device="cpu")
    with pytest.raises(CheckpointError, match="run folder .*nowhere does not exist"):
        generate(tmp_path / "nowhere", out, n=2, device="cpu")
    assert not out.exists()


def test_foreign_files_and_other_settings_need_force(run, made, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputExistsError, match=r"holds files generate did not write \(notes\.txt\).*--force"
    ):
        generate(run, out, n=1, **FAST)
    generate(run, out, n=1, augment=0, force=True, **FAST)
    assert (out / "notes.txt").read_text() == "mine" and len(read_manifest(out)) == 1
    (out / "notes.txt").unlink()
    with pytest.raises(OutputExistsError, match="other settings .*base_seed: 0 -> 3"):
        generate(run, out, n=1, augment=0, seed=3, **FAST)
    generate(run, out, n=1, augment=0, seed=3, force=True, **FAST)
    assert read_manifest(out)[0]["base_seed"] == 3


def test_full_disk_leaves_no_partial_file(run, tmp_path, monkeypatch):
    import contextlib

    import lad_fast.data.io as io

    real = io.atomic_path
    calls = []

    @contextlib.contextmanager
    def full(target, suffix=""):
        with real(target, suffix) as tmp:
            yield tmp
            calls.append(target)
            if len(calls) == 2:  # the first volume's mask: its image is already in place
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "atomic_path", full)
    out = tmp_path / "o"
    with pytest.raises(LadFastError, match="no space left on device while writing volume lad_000000.*rerun"):
        generate(run, out, n=2, augment=0, batch=2, **FAST)
    assert [p for p in out.rglob("*") if p.is_file()] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_writes_disjoint_ids_and_one_manifest(run, made, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys\nfrom lad_fast.generate.generate import generate\n"
        "generate(sys.argv[1], sys.argv[2], n=5, augment=2, batch=2, seed=1, sampler='ddim', steps=3, "
        "guidance=2.0, device='cpu')\n"
    )
    out = tmp_path / "dist"
    env = {**os.environ, "LAD_FAST_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(worker), str(run), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (out / MANIFEST).read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2, 3, 4]
    assert all(r["rank"] == r["index"] % 2 for r in lines)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", MANIFEST, "masks"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5
    ref = _images(made)
    got = _images(out)
    assert got.keys() == ref.keys()
    assert max(int(np.abs(got[k].astype(int) - ref[k].astype(int)).max()) for k in ref) <= 1


# ------------------------------------------------------------------------------------- parts, no files


def _tiny_net(structure_dim: int = 6):
    import torch

    from lad_fast.models.unet import LatentUNet

    cfg = small_config()
    torch.manual_seed(0)
    net = LatentUNet(cfg.unet, cfg.condition, 4, structure_dim).eval().requires_grad_(False)
    for p in net.parameters():  # a trained net is not the zero predictor, nor blind to its conditions
        p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddim", 3, 0.5), ("ddpm", 20, None), ("dpmpp2m", 3, None)]
)
def test_sample_latents_gives_each_seed_the_same_latent_whatever_the_batch(sampler, steps, eta):
    import torch

    from lad_fast.diffusion.schedules import make_schedule
    from lad_fast.generate.generate import SamplerSettings, sample_latents

    net = _tiny_net()
    sched = make_schedule(small_config().diffusion)
    shape = (4, 4, 8, 8)
    g = torch.Generator().manual_seed(1)
    content, structure = torch.randn(3, *shape, generator=g), torch.rand(3, 6, generator=g)
    seeds = [11, 22, 33]
    settings = SamplerSettings(sampler, steps, 2.0, eta)

    def run(idx, settings=settings, seeds=seeds):
        return sample_latents(
            net, net, content[idx], structure[idx], [seeds[i] for i in idx], settings,
            sched=sched, prediction="eps", shape=shape,
        )  # fmt: skip

    batch = run([0, 1, 2])
    assert batch.shape == (3, *shape) and torch.isfinite(batch).all()
    for k in range(3):
        torch.testing.assert_close(run([k])[0], batch[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(run([2, 0])[1], batch[0], rtol=0, atol=1e-6)  # position in the batch
    assert not torch.allclose(batch[0], batch[1])
    # the conditions matter: guidance 0 (unconditional) gives other latents from the same seeds
    assert not torch.allclose(run([0, 1, 2], SamplerSettings(sampler, steps, 0.0, eta)), batch)
    assert not torch.allclose(run([0], seeds=[12, 22, 33])[0], batch[0])


def test_sampler_options_name_what_each_sampler_reads():
    from lad_fast.generate.generate import sampler_options

    assert sampler_options("ddim") == {"steps", "eta"}
    assert sampler_options("dpmpp2m") == {"steps"}
    assert sampler_options("ddpm") == frozenset()


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp2m"])
def test_eta_with_a_sampler_that_ignores_it_is_refused(tmp_path, sampler):
    # refused before the run is opened: there is no run here
    with pytest.raises(
        ConfigError,
        match=f"^--eta has no effect on the {sampler} sampler; drop --eta, or use --sampler ddim$",
    ):
        generate(tmp_path / "nowhere", tmp_path / "o", n=1, sampler=sampler, eta=0.0, device="cpu")
    assert not (tmp_path / "o").exists()


def test_manifest_records_no_eta_for_a_sampler_that_does_not_read_it(run, tmp_path):
    generate(run, tmp_path / "o", n=1, augment=0, sampler="dpmpp2m", steps=2, device="cpu")
    (record,) = read_manifest(tmp_path / "o").values()
    assert record["sampler"] == "dpmpp2m" and record["steps"] == 2 and record["eta"] is None


def test_cli_refuses_eta_with_ddpm_and_does_not_when_eta_is_not_given(tmp_path, capsys):
    from lad_fast.cli.app import main

    args = ["generate", "--out", str(tmp_path / "o"), "--run", str(tmp_path / "nowhere"), "--sampler", "ddpm"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--eta", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert (
        err == "lad-fast: error: --eta has no effect on the ddpm sampler; drop --eta, or use --sampler ddim\n"
    )
    with pytest.raises(SystemExit) as exc:
        main(args)  # without --eta: past the eta check, stopped by the missing run
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--eta" not in err and "nowhere does not exist" in err


@pytest.mark.slow  # inductor compiles the U-Net: 2-3 min cold on two busy cores, ~25 s with its cache
def test_compile_backend_gives_the_eager_volumes(run, tmp_path):
    # torch.compile of the tiny U-Net on the CPU (inductor); one DDIM step keeps it to one compiled graph
    settings = {**FAST, "steps": 1}
    generate(run, tmp_path / "eager", n=2, augment=0, batch=2, seed=4, **settings)
    generate(run, tmp_path / "compiled", n=2, augment=0, batch=2, seed=4, backend="compile", **settings)
    a, b = _images(tmp_path / "eager"), _images(tmp_path / "compiled")
    assert a.keys() == b.keys() and len(a) == 2
    assert max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a) <= 1
    assert {r["backend"] for r in read_manifest(tmp_path / "compiled").values()} == {"compile"}


def test_steps_with_a_sampler_that_walks_all_t_steps_is_refused(tmp_path):
    # refused before the run is opened: there is no run here
    with pytest.raises(
        ConfigError,
        match=r"^--steps has no effect on the ddpm sampler \(it walks all T timesteps\); drop --steps, "
        r"or use --sampler ddim, dpmpp2m, euler, heun",
    ):
        generate(tmp_path / "nowhere", tmp_path / "o", n=1, sampler="ddpm", steps=50, device="cpu")
    assert not (tmp_path / "o").exists()


def test_steps_with_the_runs_default_ddpm_sampler_is_refused(run, tmp_path, monkeypatch):
    from lad_fast.runs.rundir import RunDir

    real = RunDir.config

    def ddpm_default(self):  # a run whose preset samples with DDPM (lad-official)
        import dataclasses

        cfg = real(self)
        return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, sampler="ddpm"))

    monkeypatch.setattr(RunDir, "config", ddpm_default)
    with pytest.raises(ConfigError, match="^--steps has no effect on the ddpm sampler"):
        generate(run, tmp_path / "o", n=1, steps=5, device="cpu")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("guidance", float("nan")), ("guidance", float("inf")), ("eta", float("nan")), ("eta", float("-inf"))],
)
def test_non_finite_options_are_refused(tmp_path, option, value):
    kwargs = {"sampler": "ddim", option: value}
    with pytest.raises(ConfigError, match=f"^--{option} must be a finite number, got {value}$"):
        generate(tmp_path / "nowhere", tmp_path / "o", n=1, device="cpu", **kwargs)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_nan_guidance_in_one_line(tmp_path, capsys):
    from lad_fast.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--out", str(tmp_path / "o"), "--run", str(tmp_path / "r"), "--guidance", "nan"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "lad-fast: error: --guidance must be a finite number, got nan\n"


def test_non_finite_latents_never_become_a_volume(run, tmp_path, monkeypatch):
    import torch

    import lad_fast.generate.generate as g

    real = g.sample_latents

    def nan_second(*args, **kwargs):  # the second volume of the batch diverged
        x0 = real(*args, **kwargs)
        x0[1] = float("nan")
        return x0

    monkeypatch.setattr(g, "sample_latents", nan_second)
    out = tmp_path / "o"
    with pytest.raises(
        CheckpointError,
        match=r"^volume lad_000001: the sampled latents are not finite \(NaN/Inf\) with sampler ddim, "
        r"3 steps, guidance 2\.0, eta 0\.0; nothing written for it",
    ):
        generate(run, out, n=2, augment=0, batch=2, **FAST)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["lad_000000.nii.gz"]
    assert list(read_manifest(out)) == [0]  # the finite one is kept, nothing of the other
    assert torch.isfinite(torch.from_numpy(_images(out)["lad_000000.nii.gz"])).all()


def test_a_missing_run_lists_the_runs_that_exist(run, tmp_path):
    with pytest.raises(
        CheckpointError,
        match=rf"folder .*nowhere does not exist \(runs in .*: {run.name}; pass one of them with --run\)$",
    ):
        generate(run.parent / "nowhere", tmp_path / "o", n=1, device="cpu")
    with pytest.raises(
        CheckpointError, match=r"does not exist \(no runs in .*; train a model first or pass another --run\)$"
    ):
        generate(tmp_path / "nowhere", tmp_path / "o", n=1, device="cpu")


def test_cli_without_run_says_which_run_it_took(run, tmp_path, monkeypatch, capsys):
    from lad_fast.cli.app import main

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--out", "o", "--n", "1", "--augment", "0", "--sampler", "ddim", "--steps", "2",
              "--device", "cpu"])  # fmt: skip
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert "lad-fast: using run runs/mine (the latest complete run)\n" in captured.err
    assert "generated 1 volume in o" in captured.out


# -------------------------------------------------------------- self-contained runs, run refs, --n


def test_a_run_folder_is_self_contained_and_old_absolute_references_still_load(run, tmp_path, capsys):
    import shutil

    from lad_fast.cli.app import main
    from lad_fast.runs.loading import checkpoint_hash, load_diffusion, vqgan_run_of

    meta = load_diffusion(run)[1]
    assert meta["vqgan_run"] == "."  # relative to the run: a copy uses its own VQ-GAN
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert vqgan_run_of(copy, load_diffusion(copy)[1]) == copy
    real = checkpoint_hash(copy / "vqgan")
    # runs written before: an absolute path; gone (the run moved), its own VQ-GAN with that hash is taken
    assert vqgan_run_of(copy, {"vqgan_run": str(tmp_path / "moved-away"), "vqgan_hash": real}) == copy
    assert vqgan_run_of(copy, {"vqgan_run": str(run), "vqgan_hash": real}) == run  # still there: as before
    for ref, vq_hash in ((str(tmp_path / "moved-away"), "another"), ("../gone", real)):
        with pytest.raises(CheckpointError) as info:
            vqgan_run_of(copy, {"vqgan_run": ref, "vqgan_hash": vq_hash})
        message = str(info.value)
        assert "which is not there (moved or deleted?)" in message
        assert f"`lad-fast train diffusion --run {copy} --vqgan VQGAN_RUN --force`" in message
    with pytest.raises(SystemExit):
        main(["train", "diffusion", "--help"])
    help_text = capsys.readouterr().out
    assert "--vqgan" in help_text and "--force" in help_text and "--run" in help_text  # the hint's options


def test_runs_are_found_relative_to_the_current_folder_or_absolute(run, tmp_path, monkeypatch, capsys):
    from lad_fast.cli.app import main
    from lad_fast.cli.train_cmds import resolve_run

    monkeypatch.chdir(run.parent)
    assert resolve_run(run.name) == Path(run.name)  # ./<name> is a run and runs/<name> is not there
    assert resolve_run(f"./{run.name}") == Path(run.name) and resolve_run(str(run)) == run
    assert resolve_run("other") == Path("runs") / "other"  # a new run goes under runs/
    for ref, out in ((run.name, tmp_path / "a"), (str(run), tmp_path / "b")):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--run", ref, "--out", str(out), "--n", "1", "--augment", "0",
                  "--sampler", "ddim", "--steps", "2", "--device", "cpu"])  # fmt: skip
        assert exc.value.code == 0 and len(read_manifest(out)) == 1
    capsys.readouterr()


def test_a_huge_n_is_refused_before_anything_is_written(tmp_path, capsys):
    from lad_fast.cli.app import main

    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--run", str(tmp_path / "nowhere"), "--out", str(out), "--n", "1000000000"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert "--n 1000000000 is more than one generate call makes (1,000,000 volumes" in err
    assert not out.exists()


def test_writing_batch_k_overlaps_sampling_batch_k_plus_1(run, made, tmp_path, monkeypatch):
    """The first volume's write waits until the second batch is being sampled: without the worker thread
    this would never happen (the wait would time out)."""
    import threading

    import lad_fast.generate.generate as g
    from lad_fast.generate.writer import VolumeWriter

    sampling_next, calls = threading.Event(), []
    real_sample, real_write = g.sample_latents, VolumeWriter.write

    def sample(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            sampling_next.set()
        return real_sample(*args, **kwargs)

    def write(self, i, *args, **kwargs):
        if i == 0:
            assert sampling_next.wait(30), "batch 2 was not sampled while batch 1 was being written"
        real_write(self, i, *args, **kwargs)

    monkeypatch.setattr(g, "sample_latents", sample)
    monkeypatch.setattr(VolumeWriter, "write", write)
    generate(run, tmp_path / "o", n=5, augment=2, batch=2, seed=1, **FAST)
    assert calls == ["MainThread"] * 3
    assert all(np.array_equal(_images(tmp_path / "o")[k], v) for k, v in _images(made).items())


def test_decode_tile_gives_the_whole_decodes_volumes(run, made, tmp_path, monkeypatch):
    import lad_fast.generate.tiled as tiled

    used = []
    real = tiled.tiled_decode
    monkeypatch.setattr(tiled, "tiled_decode", lambda *a, **k: used.append(a[2]) or real(*a, **k))
    generate(run, tmp_path / "t", n=5, augment=2, batch=2, seed=1, decode_tile=2, **FAST)
    assert used == [2] * 5
    a, b = _images(tmp_path / "t"), _images(made)
    assert a.keys() == b.keys()
    # float32 rounding (~1e-6 in [-1, 1]) can flip an int16 HU rounding at most
    assert max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a) <= 1
    with pytest.raises(ConfigError, match=r"--decode-tile must be >= 0 \(0: never tile\), got -1"):
        generate(run, tmp_path / "bad", n=1, decode_tile=-1, **FAST)
    assert not (tmp_path / "bad").exists()


def test_decode_tiles_by_itself_above_the_memory_budget(run, tmp_path, monkeypatch):
    import torch

    import lad_fast.generate.tiled as tiled
    from lad_fast.generate.generate import load_generator

    gen = load_generator(run, torch.device("cpu"))
    x0 = torch.rand(1, *gen.latent_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = gen.decode(x0, 0)[0]
    used = []
    real = tiled.tiled_decode
    monkeypatch.setattr(tiled, "tiled_decode", lambda *a, **k: used.append(a[2]) or real(*a, **k))
    monkeypatch.setenv("LAD_FAST_DECODE_BUDGET_MB", "0.5")
    auto = gen.decode(x0)[0]
    assert used and used[0] < max(gen.latent_shape[1:])
    np.testing.assert_allclose(auto, whole, rtol=0, atol=1e-5)
    # Less overlap than the receptive radius: approximate, within a tolerance that depends on the
    # network. Tiles of 4 latent voxels, overlap 1 of the 2 needed: on the trained tiny main job (1800
    # VQ-GAN steps) max abs error 0.32, mean 0.011 on [-1, 1] (~2 HU mean); on this test's 2-step VQ-GAN
    # max 2.03, mean 0.16 (it has barely learnt). Stated tolerance for this network: mean <= 0.25,
    # max <= 3.
    latent = gen.vq.quantize(gen.vq.from_unit(gen.denormalize(x0).clamp(-1, 1)))
    approx = real(gen.vq.decoder, latent, 4, overlap=1)[0, 0].numpy()
    err = np.abs(approx - whole)
    assert err.max() > 1e-4  # not the exact case
    assert err.max() <= 3.0 and err.mean() <= 0.25


def test_an_interrupt_while_sampling_leaves_only_complete_volumes(run, made, tmp_path, monkeypatch):
    import lad_fast.generate.generate as g

    real, calls = g.sample_latents, []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(g, "sample_latents", interrupted_second_batch)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        generate(run, out, n=5, augment=2, batch=2, seed=1, **FAST)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    ids = sorted(r["id"] for r in read_manifest(out).values())
    assert files == sorted([MANIFEST] + [f"{d}/{i}.nii.gz" for i in ids for d in ("images", "masks")])
    monkeypatch.setattr(g, "sample_latents", real)
    generate(run, out, n=5, augment=2, batch=2, seed=1, **FAST)  # the rerun completes the set
    assert all(np.array_equal(_images(out)[k], v) for k, v in _images(made).items())


# -------------------------------------------------------------- loading the run once


def test_generate_opens_the_run_and_parses_its_config_once(run, tmp_path, monkeypatch):
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
    generate(run, tmp_path / "o", n=1, augment=0, **{**FAST, "steps": 1})
    assert opened == [run] and parsed == [run]  # the VQ-GAN is the run's own: not opened again


def test_a_vqgan_changed_after_the_diffusion_model_trained_is_refused(run, tmp_path):
    import re
    import shutil

    import torch

    from lad_fast.runs.checkpoints import load_checkpoint, save_checkpoint
    from lad_fast.runs.loading import load_vqgan

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ckpt = load_checkpoint(copy / "vqgan", "vqgan")
    vq, _ = load_vqgan(copy)
    with torch.no_grad():
        next(vq.parameters()).add_(0.01)  # retrained, say
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "step", "files")}
    save_checkpoint(copy / "vqgan", ckpt.step + 1, modules={"model": vq}, state=ckpt.state, meta=meta)
    with pytest.raises(
        CheckpointError,
        match=rf"^the VQ-GAN in {re.escape(str(copy))} changed after the diffusion model of "
        rf"{re.escape(str(copy))} was trained on its latents; retrain the diffusion model "
        rf"\(`lad-fast train diffusion --run {re.escape(str(copy))} --force`\) or restore that VQ-GAN$",
    ):
        generate(copy, tmp_path / "o", n=1, device="cpu")
    assert not (tmp_path / "o").exists()


def test_a_run_that_records_no_training_data_asks_for_masks(run, tmp_path, monkeypatch):
    import dataclasses

    import lad_fast.generate.generate as g
    from lad_fast.errors import InputError

    real = g.load_generator

    def without_data(*args, **kwargs):
        gen = real(*args, **kwargs)
        return dataclasses.replace(gen, meta={k: v for k, v in gen.meta.items() if k != "data"})

    monkeypatch.setattr(g, "load_generator", without_data)
    with pytest.raises(
        InputError, match=r"^the run: the masks to condition on are not there; pass --masks PREPARED\|DIR$"
    ):
        generate(run, tmp_path / "o", n=1, **FAST)
    assert not (tmp_path / "o").exists()
