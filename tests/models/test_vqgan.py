"""3D VQ-GAN: shapes, stage contract, straight-through gradient, EMA update, dead-code restart, scale."""

from __future__ import annotations

import re
import time

import pytest
import torch

from lad_fast.config import VQGANConfig, get_preset
from lad_fast.errors import ConfigError
from lad_fast.kernels import vq_nearest_ref
from lad_fast.models.vqgan import VQGAN, EMAQuantizer, count_parameters

SMALL = VQGANConfig(channels=(8, 16, 16), groups=4, latent_channels=4, code_dim=4, codebook_size=32)


def _small(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(SMALL, impl="torch")


def test_forward_and_stage_contract_shapes() -> None:
    model = _small()
    x = torch.randn(2, 1, 8, 16, 16)
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.latents.shape == out.pre_quant.shape == (2, 4, 2, 4, 4)
    assert out.indices.shape == (2, 2, 4, 4) and out.indices.dtype == torch.int64
    assert out.vq_loss.ndim == 0 and out.perplexity.ndim == 0
    model.eval()
    lat = model.encode(x)
    assert lat.shape == (2, 4, 2, 4, 4)
    assert model.decode(lat).shape == x.shape
    # Every quantised latent vector is a codebook row.
    rows = lat.movedim(1, -1).reshape(-1, 4)
    assert (rows[:, None] - model.quantizer.codebook[None]).abs().sum(-1).min(1).values.max() == 0
    torch.testing.assert_close(lat, model.quantize(model.encode_pre_quant(x)))


def test_quantize_never_updates_codebook() -> None:
    model = _small().train()
    before = model.quantizer.codebook.clone()
    model.quantize(torch.randn(1, 4, 2, 2, 2))
    model.encode(torch.randn(1, 1, 8, 8, 8))
    torch.testing.assert_close(model.quantizer.codebook, before, rtol=0, atol=0)


def test_straight_through_gradient_and_commitment() -> None:
    torch.manual_seed(0)
    q = EMAQuantizer(16, 4, commitment=0.25, impl="torch").eval()
    z = torch.randn(2, 4, 2, 3, 3, requires_grad=True)
    out = q(z)
    codes = q.codebook[out.indices].movedim(-1, 1)
    torch.testing.assert_close(out.quantized, codes)  # forward value: the codes
    w = torch.randn_like(z)
    (out.quantized * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # gradient: copied straight through
    z.grad = None
    q(z).loss.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - codes).detach() / z.numel())


def test_gradients_reach_encoder_and_decoder() -> None:
    model = _small().train()
    out = model(torch.randn(2, 1, 8, 16, 16))
    (out.recon.abs().mean() + out.vq_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_ema_update_follows_formula_and_only_in_training() -> None:
    torch.manual_seed(0)
    q = EMAQuantizer(8, 3, decay=0.9, dead_code_threshold=0.0, eps=1e-5, impl="torch")
    q.codebook.copy_(torch.randn(8, 3))
    q.cluster_size.fill_(2.0)
    q.embed_sum.copy_(q.codebook * 2.0)
    z = torch.randn(1, 3, 2, 2, 5)
    q.eval()
    q(z)
    assert torch.equal(q.cluster_size, torch.full((8,), 2.0))  # eval: no update
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q.train()
    out = q(z)
    z_flat = z.movedim(1, -1).reshape(-1, 3)
    idx = vq_nearest_ref(z_flat, state["codebook"])[0]
    assert torch.equal(out.indices.flatten(), idx)
    counts = torch.stack([(idx == k).sum() for k in range(8)]).float()
    sums = torch.stack([z_flat[idx == k].sum(0) for k in range(8)])
    cs = 0.9 * state["cluster_size"] + 0.1 * counts
    es = 0.9 * state["embed_sum"] + 0.1 * sums
    n = cs.sum()
    smoothed = (cs + 1e-5) / (n + 8 * 1e-5) * n
    torch.testing.assert_close(q.cluster_size, cs)
    torch.testing.assert_close(q.embed_sum, es)
    torch.testing.assert_close(q.codebook, es / smoothed[:, None])
    assert out.restarted.item() == 0


def test_dead_codes_restart_from_batch_vectors() -> None:
    torch.manual_seed(0)
    q = EMAQuantizer(4, 2, decay=0.99, dead_code_threshold=1.0, impl="torch").train()
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    q.cluster_size.copy_(torch.tensor([500.0, 0.5, 0.5, 0.5]))  # code 0 alive, 1..3 dead after decay
    q.embed_sum.copy_(q.codebook * q.cluster_size[:, None])
    z = 0.1 * torch.randn(1, 2, 2, 4, 4)  # every vector picks code 0
    out = q(z)
    assert out.restarted.item() == 3
    z_flat = z.movedim(1, -1).reshape(-1, 2)
    for k in (1, 2, 3):  # each restarted code is one of the batch's vectors
        assert (z_flat - q.codebook[k]).abs().sum(1).min() == 0
        assert q.cluster_size[k] == 1.0
        torch.testing.assert_close(q.embed_sum[k], q.codebook[k] * 1.0)
    assert q.codebook[0].abs().max() < 1.0  # the live code moved toward the batch, not restarted
    assert q.cluster_size[0] > 400


def test_first_training_step_initialises_codebook_from_data() -> None:
    torch.manual_seed(0)
    q = EMAQuantizer(16, 2, impl="torch").train()
    z = 5.0 + 0.01 * torch.randn(1, 2, 4, 4, 4)  # far from the N(0, 1) initial codes
    q(z)
    assert (q.codebook - 5.0).abs().max() < 0.1
    # Now codes sit on the data: perplexity of the next batch is above 1.
    assert q(z).perplexity > 1.0


def test_training_forward_is_deterministic_given_seed() -> None:
    x = torch.randn(2, 1, 8, 16, 16)
    results = []
    for _ in range(2):
        model = _small(seed=3).train()
        torch.manual_seed(11)
        outs = [model(x) for _ in range(2)]
        results.append((model.quantizer.codebook.clone(), outs[-1].recon.detach(), outs[-1].indices))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])


def test_quantizer_distances_in_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    q = EMAQuantizer(64, 4, impl="torch").eval()
    z = torch.randn(2, 4, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    ref = vq_nearest_ref(z.bfloat16().float().movedim(1, -1).reshape(-1, 4), q.codebook)[0]
    assert torch.equal(out.indices.flatten(), ref)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_latent_scale_round_trip() -> None:
    model = _small().eval()
    lo, hi = model.latent_scale()
    cb = model.quantizer.codebook
    assert lo == pytest.approx(cb.min().item()) and hi == pytest.approx(cb.max().item())
    lat = model.encode(torch.randn(2, 1, 8, 16, 16))
    u = model.to_unit(lat)
    assert u.min() >= -1 - 1e-6 and u.max() <= 1 + 1e-6
    torch.testing.assert_close(model.from_unit(u), lat, rtol=1e-5, atol=1e-5)
    ends = model.to_unit(torch.tensor([lo, hi]))
    torch.testing.assert_close(ends, torch.tensor([-1.0, 1.0]))


def test_bad_config_and_input_errors() -> None:
    with pytest.raises(ConfigError, match=re.escape("latent_channels (8) must equal code_dim (4)")):
        VQGAN(VQGANConfig(latent_channels=8, code_dim=4))
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        VQGAN(VQGANConfig(ema_decay=1.0))
    with pytest.raises(ConfigError, match="multiples of 4"):
        _small()(torch.randn(1, 1, 6, 16, 16))
    with pytest.raises(ConfigError, match="expected 4 channels"):
        EMAQuantizer(8, 4)(torch.randn(1, 3, 2, 2, 2))


@pytest.mark.slow  # one lad-sized encode: ~10-30 s on two CPU cores, most of it the reference VQ search
def test_lad_preset_parameter_count_and_latent_shape() -> None:
    import lad_fast.models.vqgan as vqgan_module

    cfg = get_preset("lad").vqgan
    model = VQGAN(cfg).eval()
    n = count_parameters(model)
    documented = int(
        re.search(r"([\d,]+) trainable parameters", vqgan_module.__doc__).group(1).replace(",", "")
    )
    assert n == documented == 736_073
    assert model.quantizer.codebook.shape == (16384, 8)
    t0 = time.perf_counter()
    with torch.no_grad():
        lat = model.encode(torch.randn(1, 1, 32, 256, 256))
    assert lat.shape == (1, 8, 8, 64, 64)
    print(f"lad encode 1x1x32x256x256 on CPU: {time.perf_counter() - t0:.2f} s")


def test_chunked_reference_search_matches_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    vq_module = importlib.import_module("lad_fast.kernels.vq_nearest")

    torch.manual_seed(0)
    q = EMAQuantizer(16, 3, impl="torch")
    z = torch.randn(37, 3)  # not a multiple of the chunk
    whole = vq_nearest_ref(z, q.codebook)[0]
    monkeypatch.setattr(vq_module, "REF_CHUNK", 64)  # 4 rows per chunk
    assert torch.equal(q.nearest(z), vq_nearest_ref(z, q.codebook)[0])
    assert torch.equal(q.nearest(z), whole)
