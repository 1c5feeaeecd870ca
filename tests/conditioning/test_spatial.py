"""Spatial mask conditioning (``condition.spatial = "concat"``): the tensor, the U-Net input, guidance
dropout in training batches, sampling, ONNX export, and a short train + generate run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import small_config

from lad_fast.conditioning.conditions import (
    drop_spatial,
    null_spatial,
    spatial_channels,
    spatial_condition,
    spatial_for,
)
from lad_fast.config import PRESETS, ConditionConfig, UNetConfig, get_preset
from lad_fast.errors import ConfigError, InputError
from lad_fast.models.unet import LatentUNet, build_unet
from lad_fast.organs import CANONICAL_ID, NUM_CLASSES


def spatial_config(steps: int = 2):
    cfg = small_config(diffusion_steps=steps)
    return replace(cfg, condition=replace(cfg.condition, spatial="concat"))


# ------------------------------------------------------------------------------------- the tensor


def test_spatial_condition_holds_each_latent_voxels_organ_fractions():
    liver, spleen, pancreas = CANONICAL_ID["liver"], CANONICAL_ID["spleen"], CANONICAL_ID["pancreas"]
    mask = np.zeros((2, 4, 6), dtype=np.uint8)  # latent grid (1, 2, 2): cells of 2 x 2 x 3 = 12 voxels
    mask[0, 0, 0] = liver  # cell (0, 0, 0): 1 liver, 2 pancreas, 9 background
    mask[1, 1, 1:3] = pancreas
    mask[:, 2:, 3:] = spleen  # cell (0, 1, 1): all spleen
    mask[0, 3, 0] = liver  # cell (0, 1, 0): 1 liver, 11 background
    s = spatial_condition(mask, (1, 2, 2))
    assert s.shape == (NUM_CLASSES, 1, 2, 2) and s.dtype == torch.float32
    expect = torch.zeros(NUM_CLASSES, 1, 2, 2)
    expect[0, 0, 0, 0], expect[liver, 0, 0, 0], expect[pancreas, 0, 0, 0] = 9 / 12, 1 / 12, 2 / 12
    expect[0, 0, 0, 1] = 1.0  # cell (0, 0, 1): background only
    expect[0, 0, 1, 0], expect[liver, 0, 1, 0] = 11 / 12, 1 / 12
    expect[spleen, 0, 1, 1] = 1.0
    torch.testing.assert_close(s, expect, rtol=0, atol=1e-7)
    # the one-hot average-pooled by torch, as the docstring defines it
    onehot = torch.nn.functional.one_hot(torch.from_numpy(mask).long(), NUM_CLASSES).permute(3, 0, 1, 2)
    ref = torch.nn.functional.avg_pool3d(onehot[None].float(), (2, 2, 3))[0]
    torch.testing.assert_close(s, ref, rtol=0, atol=1e-7)


def test_spatial_condition_refuses_bad_masks_and_grids():
    with pytest.raises(ConfigError, match=r"mask grid \(4, 4, 4\) is not a whole multiple of the latent"):
        spatial_condition(np.zeros((4, 4, 4), dtype=np.int64), (3, 2, 2))
    with pytest.raises(InputError, match=r"ids outside 0\.\.11 \(min 0, max 12\)"):
        spatial_condition(np.array([0, 12]).reshape(1, 1, 2), (1, 1, 1))
    with pytest.raises(InputError, match=r"needs a \(D, H, W\) integer mask, got float32"):
        spatial_condition(np.zeros((2, 2, 2), dtype=np.float32), (1, 1, 1))


def test_fine_spatial_condition_places_each_octant_on_its_own_channel():
    liver = CANONICAL_ID["liver"]
    mask = np.zeros(
        (4, 4, 4), dtype=np.uint8
    )  # latent grid (1, 1, 2): each cell 4 x 4 x 2, octants 2 x 2 x 1
    mask[2:4, 0:2, 3] = liver  # cell (0, 0, 1), octant (1, 0, 1) = 5: all liver, the cell 1/8 liver
    fine = spatial_for(mask, (1, 1, 2), "concat_fine")
    assert fine.shape == (8 * NUM_CLASSES, 1, 1, 2)
    assert fine[liver * 8 + 5, 0, 0, 1] == 1.0 and fine[liver * 8 : liver * 8 + 8].sum() == 1.0
    assert fine[5, 0, 0, 1] == 0.0 and fine[0:8, 0, 0, 0].sum() == 8.0  # background octants of both cells
    # octants average to the coarse fractions, and each octant's classes sum to 1 (zeros stay the null)
    coarse = spatial_for(mask, (1, 1, 2), "concat")
    torch.testing.assert_close(fine.reshape(NUM_CLASSES, 8, 1, 1, 2).mean(1), coarse, rtol=0, atol=1e-7)
    torch.testing.assert_close(fine.reshape(NUM_CLASSES, 8, 1, 1, 2).sum(0), torch.ones(8, 1, 1, 2))
    assert torch.equal(coarse, spatial_condition(mask, (1, 1, 2)))
    assert spatial_channels(ConditionConfig(spatial="concat_fine")) == 8 * NUM_CLASSES
    with pytest.raises(
        ConfigError, match=r"mask grid \(4, 4, 4\) is not a whole multiple of the latent grid \(2, 2, 6\)"
    ):
        spatial_for(mask, (1, 1, 3), "concat_fine")


def test_drop_spatial_is_zeros_where_keep_is_zero():
    s = torch.rand(3, NUM_CLASSES, 1, 2, 2) + 0.1
    out = drop_spatial(s, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(out[0], s[0]) and torch.equal(out[2], s[2]) and not out[1].any()
    assert drop_spatial(s, None) is s and not null_spatial(s).any()


# ------------------------------------------------------------------------------------- config


def test_presets_add_the_spatial_mask_except_the_official_one():
    assert set(PRESETS) == {"tiny", "lad", "lad-official"}
    assert get_preset("tiny").condition.spatial == get_preset("lad").condition.spatial == "concat_fine"
    assert get_preset("lad-official").condition.spatial == "none"
    assert ConditionConfig().spatial == "none"  # runs written before the field: Lad's global conditions
    assert spatial_channels(get_preset("tiny").condition) == 8 * NUM_CLASSES
    assert spatial_channels(replace(ConditionConfig(), spatial="concat")) == NUM_CLASSES


def test_lad_official_refuses_spatial_conditioning():
    cfg = get_preset("lad-official")
    with pytest.raises(
        ConfigError,
        match=r"^condition\.spatial='concat' needs unet\.arch='lad_fast': the official U-Net has no spatial "
        r"input; use spatial='none' or the lad / tiny preset$",
    ):
        replace(cfg, condition=replace(cfg.condition, spatial="concat"))
    # the model refuses it too when built from its parts
    with pytest.raises(ConfigError, match="the official U-Net has no spatial input"):
        build_unet(cfg.unet, replace(cfg.condition, spatial="concat"), 8, 192)


def test_unknown_spatial_mode_is_named():
    with pytest.raises(
        ConfigError, match=r"^condition\.spatial must be one of none, concat, concat_fine, got 'film'$"
    ):
        ConditionConfig(spatial="film")


# ------------------------------------------------------------------------------------- the U-Net

UNET = UNetConfig(channels=8, multipliers=(1, 2), attention_levels=(1,), heads=2, head_dim=8, groups=4,
                  time_dim=16)  # fmt: skip
COND = ConditionConfig(content_dim=6, embed_dim=12, spatial="concat")


def spatial_net() -> LatentUNet:
    torch.manual_seed(0)
    net = LatentUNet(UNET, COND, latent_channels=3, structure_dim=10).eval()
    torch.nn.init.normal_(net.out.weight, std=0.1)  # zero-init would hide the spatial input
    return net


def masks_pair() -> torch.Tensor:
    """Spatial conditions of two different masks on a (2, 4, 6) latent grid: (2, K, 2, 4, 6)."""
    a = np.zeros((4, 8, 12), dtype=np.int64)
    b = a.copy()
    a[:, :4, :6] = CANONICAL_ID["liver"]
    b[:, 4:, 6:] = CANONICAL_ID["spleen"]
    return torch.stack([spatial_condition(m, (2, 4, 6)) for m in (a, b)])


def test_concat_unet_takes_the_mask_channels_and_its_output_follows_the_mask():
    net = spatial_net()
    assert net.spatial_channels == NUM_CLASSES and net.stem.in_channels == 3 + NUM_CLASSES
    plain = LatentUNet(UNET, replace(COND, spatial="none"), 3, 10)
    assert plain.spatial_channels == 0 and plain.stem.in_channels == 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 2, 4, 6, generator=g).expand(2, -1, -1, -1, -1)
    t = torch.tensor([5, 5])
    emb = net.null_condition(2)  # the same global condition for both: only the mask differs
    with torch.no_grad():
        out = net(x, t, emb, masks_pair())
        assert out.shape == x.shape and (out[0] - out[1]).abs().max() > 1e-3
        # guidance's null (keep 0): the mask no longer reaches the output
        dropped = net(x, t, emb, drop_spatial(masks_pair(), torch.zeros(2)))
    torch.testing.assert_close(dropped[0], dropped[1], rtol=0, atol=1e-6)


def test_spatial_input_is_required_by_concat_models_and_refused_by_plain_ones():
    net = spatial_net()
    x, t, emb = torch.randn(1, 3, 2, 4, 6), torch.tensor([1]), net.null_condition(1)
    with pytest.raises(ConfigError, match=r"needs a spatial condition of shape \(1, 12, 2, 4, 6\), got none"):
        net(x, t, emb)
    with pytest.raises(ConfigError, match=r"of shape \(1, 12, 2, 4, 6\), got \(1, 12, 2, 4, 4\)"):
        net(x, t, emb, torch.zeros(1, NUM_CLASSES, 2, 4, 4))
    plain = LatentUNet(UNET, replace(COND, spatial="none"), 3, 10)
    with pytest.raises(ConfigError, match="built with condition.spatial='none'; call it as net"):
        plain(x, t, plain.null_condition(1), torch.zeros(1, NUM_CLASSES, 2, 4, 6))


def test_plain_unet_is_unchanged_by_the_spatial_option():
    """spatial='none' builds the same parameters, in the same order, from the same seed as before."""
    torch.manual_seed(0)
    a = LatentUNet(UNET, replace(COND, spatial="none"), 3, 10)
    torch.manual_seed(0)
    b = LatentUNet(UNET, ConditionConfig(content_dim=6, embed_dim=12), 3, 10)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------- training batches


def test_latent_batches_drop_the_spatial_condition_with_keep():
    from lad_fast.train.diffusion import LatentBatches

    n = 5
    lat = {
        "latent": torch.randn(n, 4, 2, 2, 2),
        "content": torch.randn(n, 4, 2, 2, 2),
        "structure": torch.rand(n, 6),
        "spatial": torch.rand(n, NUM_CLASSES, 2, 2, 2) + 0.1,  # never zero by itself
    }
    b = LatentBatches(lat, batch_size=64, seed=3, drop_prob=0.5)(7)
    keep = b["keep"]
    assert 0 < keep.sum() < len(keep)  # both cases occur
    # which case each row is: x0 identifies it (continuous random values, no ties)
    case = [int(torch.nonzero((lat["latent"] == row).flatten(1).all(1))[0]) for row in b["x0"]]
    for row, k, c in zip(b["spatial"], keep, case, strict=True):
        assert torch.equal(row, lat["spatial"][c] if k else torch.zeros_like(row))
    assert "spatial" not in LatentBatches({k: v for k, v in lat.items() if k != "spatial"}, 4, 3, 0.5)(7)


# ------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 3), ("dpmpp2m", 3)])
def test_sample_latents_with_spatial_is_batch_invariant_and_follows_the_mask(sampler, steps):
    from lad_fast.diffusion.schedules import make_schedule
    from lad_fast.generate.generate import SamplerSettings, sample_latents

    net = spatial_net().requires_grad_(False)
    for p in net.parameters():  # a trained net is not blind to its conditions
        p.add_(0.05 * torch.randn_like(p))
    sched = make_schedule(small_config().diffusion)
    shape = (3, 2, 4, 6)
    g = torch.Generator().manual_seed(1)
    content, structure = torch.randn(3, *shape, generator=g), torch.rand(3, 10, generator=g)
    pair = masks_pair()
    spatial = torch.stack([pair[0], pair[1], pair[0]])
    seeds = [11, 22, 11]
    settings = SamplerSettings(sampler, steps, 2.0, None)

    def run(idx, spatial=spatial, settings=settings):
        return sample_latents(
            net, net, content[idx], structure[idx], [seeds[i] for i in idx], settings,
            spatial=spatial[idx], sched=sched, prediction="eps", shape=shape,
        )  # fmt: skip

    batch = run([0, 1, 2])
    for k in range(3):
        torch.testing.assert_close(run([k])[0], batch[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(run([2, 0])[1], batch[0], rtol=0, atol=1e-6)
    # same seed and global conditions, other mask: another latent
    swapped = torch.stack([pair[1], pair[1], pair[0]])
    assert not torch.allclose(run([0], spatial=swapped)[0], batch[0], atol=1e-4)
    # guidance 0 is the unconditional model: the mask does not matter there
    uncond = SamplerSettings(sampler, steps, 0.0, None)
    torch.testing.assert_close(run([0], swapped, uncond), run([0], spatial, uncond), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="this model takes a spatial condition; pass spatial="):
        sample_latents(net, net, content, structure, seeds, settings, sched=sched, prediction="eps",
                       shape=shape)  # fmt: skip


# ------------------------------------------------------------------------------------- export


def test_onnx_export_of_a_spatial_unet_equals_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from lad_fast.export.backends import make_denoiser

    net = spatial_net().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    example = [torch.zeros(1, 3, 2, 4, 6), torch.zeros(1, dtype=torch.long), torch.zeros(1, 12),
               torch.zeros(1, NUM_CLASSES, 2, 4, 6)]  # fmt: skip
    onnx = make_denoiser("onnx", net, example, ("x", "t", "cond", "spatial"), tmp_path)
    assert onnx.input_names == ["x", "t", "cond", "spatial"]
    inputs = (torch.randn(2, 3, 2, 4, 6, generator=g), torch.tensor([3, 17]), torch.randn(2, 12, generator=g),
              masks_pair())  # fmt: skip
    with torch.no_grad():
        ref = net(*inputs)
    torch.testing.assert_close(onnx(*inputs), ref, atol=1e-4, rtol=1e-4)
    # a plain model keeps the three-input graph
    plain = LatentUNet(UNET, replace(COND, spatial="none"), 3, 10).eval()
    other = make_denoiser("onnx", plain, example[:3], ("x", "t", "cond"), tmp_path / "plain")
    assert other.input_names == ["x", "t", "cond"]


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def spatial_run(tmp_path_factory, tiny_phantoms) -> Path:
    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    run = tmp_path_factory.mktemp("runs") / "spatial"
    cfg = spatial_config()
    train_vqgan(run, cfg, data=tiny_phantoms, device="cpu")
    result = train_diffusion(run, cfg, data=tiny_phantoms, device="cpu")
    assert result.step == 2 and result.bad_steps == 0
    return run


def test_spatial_training_caches_the_masks_and_the_model_reloads_with_its_input(spatial_run):
    from safetensors import safe_open

    from lad_fast.runs.loading import load_diffusion
    from lad_fast.train.diffusion import LATENTS_NAME

    with safe_open(str(spatial_run / "diffusion" / LATENTS_NAME), framework="pt") as f:
        assert f.metadata()["spatial"] == "concat"
        spatial, latent = f.get_tensor("spatial"), f.get_tensor("latent")
    assert spatial.shape == (3, NUM_CLASSES, *latent.shape[2:])
    torch.testing.assert_close(spatial.sum(1), torch.ones(3, *latent.shape[2:]))
    net, meta = load_diffusion(spatial_run)
    assert net.spatial_channels == NUM_CLASSES and net.cond_cfg.spatial == "concat"
    assert meta["model_config"]["condition"]["spatial"] == "concat"


def test_the_latent_cache_key_holds_the_spatial_mode(spatial_run, tiny_phantoms, tmp_path, monkeypatch):
    import shutil

    import lad_fast.train.diffusion as mod
    from lad_fast.runs.loading import checkpoint_hash, load_vqgan

    vq, _ = load_vqgan(spatial_run)
    vq_hash = checkpoint_hash(spatial_run / "vqgan")
    cache = tmp_path / mod.LATENTS_NAME
    shutil.copy(spatial_run / "diffusion" / mod.LATENTS_NAME, cache)
    calls = []
    real = mod.encode_case
    monkeypatch.setattr(mod, "encode_case", lambda *a, **k: calls.append(1) or real(*a, **k))

    def encode(cfg):
        calls.clear()
        got = mod.encode_dataset(vq, tiny_phantoms, cfg, cache, vq_hash, torch.device("cpu"))
        return got, len(calls)

    got, encoded = encode(spatial_config())
    assert encoded == 0 and "spatial" in got  # the training run's own cache is reused
    got, encoded = encode(small_config())
    assert encoded == 3 and "spatial" not in got  # another spatial mode: encoded again
    got, encoded = encode(spatial_config())
    assert encoded == 3 and got["spatial"].shape[1] == NUM_CLASSES
    fine = replace(spatial_config(), condition=replace(spatial_config().condition, spatial="concat_fine"))
    got, encoded = encode(fine)  # the octant fractions: encoded again, 8 channel sets
    assert encoded == 3 and got["spatial"].shape[1] == 8 * NUM_CLASSES
    torch.testing.assert_close(got["spatial"].sum(1), torch.full((3, *got["latent"].shape[2:]), 8.0))
    net = build_unet(fine.unet, fine.condition, got["latent"].shape[1], 192)
    x = got["latent"][:2]
    out = net(x, torch.tensor([1, 2]), torch.zeros(2, fine.condition.embed_dim), got["spatial"][:2])
    assert out.shape == x.shape and net.spatial_channels == 8 * NUM_CLASSES


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_spatial_run_generates(spatial_run, tmp_path, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    from lad_fast.generate.generate import MANIFEST, generate, volume_id

    out = generate(spatial_run, tmp_path / "gen", n=2, sampler="ddim", steps=2, guidance=2.0, augment=1,
                   batch=2, backend=backend, device="cpu")  # fmt: skip
    lines = [json.loads(s) for s in (out / MANIFEST).read_text().splitlines()]
    assert [line["backend"] for line in lines] == [backend] * 2
    assert all((out / "images" / f"{volume_id(i)}.nii.gz").is_file() for i in range(2))
    if backend == "onnx":
        import onnx

        path = spatial_run / "export" / "denoiser.fp32.onnx"
        names = [i.name for i in onnx.load(str(path)).graph.input]
        assert names == ["x", "t", "cond", "spatial"]
