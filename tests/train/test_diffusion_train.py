"""Latent diffusion training: mask rendering, the latent cache, batches, training, resume and loading."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _shared import small_config

from lad_fast.errors import CheckpointError, InputError
from lad_fast.runs.loading import check_vqgan_run, load_diffusion, mask_as_image, vqgan_run_of
from lad_fast.train.diffusion import LATENTS_NAME, LatentBatches, train_diffusion


@pytest.fixture(scope="session")
def vqgan_run(tmp_path_factory, tiny_phantoms) -> Path:
    from lad_fast.train.vqgan import train_vqgan

    run = tmp_path_factory.mktemp("runs") / "vq"
    train_vqgan(run, small_config(), data=tiny_phantoms, device="cpu")
    return run


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_phantoms, vqgan_run) -> Path:
    run = tmp_path_factory.mktemp("runs") / "diff"
    result = train_diffusion(run, small_config(), data=tiny_phantoms, vqgan_run=vqgan_run, device="cpu")
    assert result.step == 3
    return run


def test_mask_as_image_maps_ids_evenly_onto_minus_one_to_one():
    mask = torch.tensor([0, 1, 6, 11]).view(1, 1, 1, 4)
    img = mask_as_image(mask)
    assert img.shape == (1, 1, 1, 1, 4) and img.dtype == torch.float32
    torch.testing.assert_close(img.flatten(), torch.tensor([-1.0, -1 + 2 / 11, -1 + 12 / 11, 1.0]))


def test_mask_as_image_rejects_float_and_out_of_range_masks():
    with pytest.raises(InputError, match="integer labels"):
        mask_as_image(torch.zeros(1, 2, 2, 2))
    with pytest.raises(InputError, match=r"0\.\.11 \(canonical ids\), got 0\.\.12"):
        mask_as_image(torch.tensor([0, 12]).view(1, 1, 1, 2))


def test_latent_batches_are_a_pure_function_and_drop_conditions_at_the_configured_rate():
    lat = {
        "latent": torch.randn(5, 4, 2, 2, 2),
        "content": torch.randn(5, 4, 2, 2, 2),
        "structure": torch.rand(5, 6),
    }
    b = LatentBatches(lat, batch_size=400, seed=3, drop_prob=0.25)
    one, two = b(7, 0, 1), b(7, 0, 1)
    assert all(torch.equal(one[k], two[k]) for k in ("x0", "content", "structure", "keep"))
    assert one["seed"] == two["seed"] and one["seed"] != b(8, 0, 1)["seed"]
    assert one["x0"].shape == (400, 4, 2, 2, 2) and one["structure"].shape == (400, 6)
    assert 0.18 < 1 - one["keep"].mean().item() < 0.32  # 400 Bernoulli(0.25) draws: 5 sigma is +-0.11
    assert not torch.equal(b(7, 0, 2)["keep"], b(7, 1, 2)["keep"])  # ranks draw different dropout


def test_missing_vqgan_run_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a lad-fast run.*train a VQ-GAN first"):
        train_diffusion(tmp_path / "new", small_config(), vqgan_run=tmp_path / "nothing", device="cpu")
    assert not (tmp_path / "new").exists()


def test_vqgan_run_of_another_geometry_is_refused(vqgan_run):
    cfg = small_config()
    other = replace(cfg, geometry=replace(cfg.geometry, shape=(16, 32, 32)))
    with pytest.raises(CheckpointError, match=r"another preset or geometry \(geometry\.shape"):
        check_vqgan_run(vqgan_run, other)


def test_training_caches_latents_and_records_the_vqgan(trained, vqgan_run, tiny_phantoms):
    from safetensors import safe_open

    cache = trained / "diffusion" / LATENTS_NAME
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        latent = f.get_tensor("latent")
        assert f.get_tensor("structure").shape == (3, 16 * 3 * 2)
    assert latent.shape == (3, 4, 4, 16, 16) and latent.min() >= -1 - 1e-5 and latent.max() <= 1 + 1e-5
    assert json.loads(meta["ids"]) == [
        c["id"] for c in json.loads((tiny_phantoms / "index.json").read_text())["cases"]
    ]
    net, m = load_diffusion(trained)
    # recorded relative to the run, so the two runs can move together (issue 15)
    assert not Path(m["vqgan_run"]).is_absolute() and len(m["vqgan_hash"]) == 16
    assert (trained / m["vqgan_run"]).resolve() == vqgan_run.resolve() == vqgan_run_of(trained, m).resolve()
    assert m["structure_dim"] == 96 and m["latent_shape"] == [4, 4, 16, 16] and m["step"] == 3
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # the EMA weights are what load_diffusion returns (not the last raw weights)
    from lad_fast.runs.checkpoints import load_checkpoint

    ckpt = load_checkpoint(trained / "diffusion", "diffusion")
    ema = ckpt.tensors("ema")
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
    assert any(not torch.equal(v, ema[k]) for k, v in ckpt.tensors("model").items())


def test_second_run_reuses_the_latent_cache_and_resume_matches_an_uninterrupted_run(
    tmp_path, trained, vqgan_run, tiny_phantoms, monkeypatch
):
    from lad_fast.runs.checkpoints import load_checkpoint
    from lad_fast.train import diffusion as mod

    run = tmp_path / "part"
    train_diffusion(run, small_config(), data=tiny_phantoms, vqgan_run=vqgan_run, device="cpu", stop_at=2)
    calls = []
    real = mod.encode_case
    monkeypatch.setattr(mod, "encode_case", lambda *a, **k: calls.append(1) or real(*a, **k))
    train_diffusion(run, small_config(), data=tiny_phantoms, vqgan_run=vqgan_run, device="cpu", resume=True)
    assert calls == []  # encoded once, by the first call
    a = load_checkpoint(run / "diffusion", "diffusion")
    b = load_checkpoint(trained / "diffusion", "diffusion")
    assert a.step == b.step == 3
    for stem in ("model", "ema"):
        ta, tb = a.tensors(stem), b.tensors(stem)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_load_diffusion_without_a_trained_model_says_how_to_train(vqgan_run):
    with pytest.raises(CheckpointError, match="has no trained diffusion model.*lad-fast train diffusion"):
        load_diffusion(vqgan_run)


def test_flow_objective_trains_reloads_and_generates_with_euler(tmp_path, vqgan_run, tiny_phantoms):
    from lad_fast.config import DiffusionConfig
    from lad_fast.errors import ConfigError
    from lad_fast.generate.generate import MANIFEST, generate, volume_id

    flow = DiffusionConfig(timesteps=20, objective="flow", flow_shift=2.0, flow_logit_std=0.7)
    cfg = replace(small_config(diffusion_steps=2), diffusion=flow)
    run = tmp_path / "flow"
    result = train_diffusion(run, cfg, data=tiny_phantoms, vqgan_run=vqgan_run, device="cpu")
    assert result.step == 2 and result.bad_steps == 0 and result.losses
    # the objective lives in the checkpoint's model_config and comes back with the model
    assert load_diffusion(run)[1]["diffusion_config"] == flow
    out = tmp_path / "gen"
    generate(run, out, n=1, sampler="euler", steps=3, augment=0, batch=1, device="cpu")
    (line,) = (out / MANIFEST).read_text().splitlines()
    assert json.loads(line)["sampler"] == "euler" and (out / "images" / f"{volume_id(0)}.nii.gz").is_file()
    with pytest.raises(
        ConfigError, match="sampler 'ddim' does not fit this model, trained with objective 'flow'"
    ):
        generate(run, tmp_path / "gen2", n=1, sampler="ddim", steps=3, device="cpu")
    assert not (tmp_path / "gen2").exists()


def test_generate_takes_the_runs_sampling_defaults_and_options_override_them(
    tmp_path, vqgan_run, tiny_phantoms
):
    """The run's config records what ``generate`` does without options (its preset's measured best)."""
    from lad_fast.config import DiffusionConfig, SamplingConfig
    from lad_fast.generate.generate import MANIFEST, generate

    cfg = replace(
        small_config(diffusion_steps=2),
        diffusion=DiffusionConfig(timesteps=20, objective="flow"),
        sampling=SamplingConfig(sampler="heun", steps=2, guidance=1.5),
    )
    run = tmp_path / "flow"
    train_diffusion(run, cfg, data=tiny_phantoms, vqgan_run=vqgan_run, device="cpu")
    generate(run, tmp_path / "a", n=1, augment=0, batch=1, device="cpu")
    rec = json.loads((tmp_path / "a" / MANIFEST).read_text().splitlines()[0])
    assert (rec["sampler"], rec["steps"], rec["guidance"]) == ("heun", 2, 1.5)
    generate(run, tmp_path / "b", n=1, sampler="euler", guidance=0.0, augment=0, batch=1, device="cpu")
    rec = json.loads((tmp_path / "b" / MANIFEST).read_text().splitlines()[0])
    assert (rec["sampler"], rec["steps"], rec["guidance"]) == ("euler", 2, 0.0)


@pytest.mark.parametrize("train_content", [False, True])
def test_untrained_content_projection_stays_at_its_random_initialisation(
    tmp_path, vqgan_run, tiny_phantoms, train_content
):
    """condition.train_content=False (Lad's untrained content projection) freezes the content head at the
    weights the run's seed drew; everything else trains. With True the content head trains too."""
    from lad_fast.models.unet import build_unet

    base = small_config()
    cfg = replace(base, condition=replace(base.condition, train_content=train_content))
    run = tmp_path / "run"
    train_diffusion(run, cfg, data=tiny_phantoms, vqgan_run=vqgan_run, device="cpu")
    net, _ = load_diffusion(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.diffusion_train.seed)
        init = build_unet(cfg.unet, cfg.condition, net.latent_channels, net.structure_dim)
    trained, start = net.state_dict(), init.state_dict()
    head = [k for k in start if k.startswith("content_head.")]
    assert head and all(k in trained for k in head)
    same_head = all(torch.equal(trained[k], start[k]) for k in head)
    assert same_head is (not train_content)
    assert not torch.equal(trained["stem.weight"], start["stem.weight"])  # the rest trains either way


def test_train_content_must_be_a_bool():
    from lad_fast.config import ConditionConfig, config_from_dict
    from lad_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="condition.train_content must be true or false, got 'no'"):
        config_from_dict({"condition": {"train_content": "no"}})
    assert ConditionConfig().train_content is True
