"""The diffusion trainer's latent cache (``diffusion/latents.safetensors``) records the hash of its content
and its inputs; a cache that disagrees with either is encoded again with one line saying why, so a
flipped bit never reaches training."""

from __future__ import annotations

import json

import pytest
import torch
from _shared import small_config
from safetensors import safe_open

import lad_fast.train.diffusion as mod
from lad_fast.models.vqgan import VQGAN


@pytest.fixture
def encoded(tiny_phantoms, tmp_path, monkeypatch):
    """(encode(cfg, **kw) -> (latents, cases encoded), the cache, the first encoding)."""
    torch.manual_seed(0)
    vq = VQGAN(small_config().vqgan).eval()
    cache = tmp_path / mod.LATENTS_NAME
    calls = []
    real = mod.encode_case
    monkeypatch.setattr(mod, "encode_case", lambda *a, **k: calls.append(1) or real(*a, **k))

    def encode(cfg=None, vqgan_hash="vq-hash-1"):
        calls.clear()
        got = mod.encode_dataset(
            vq, tiny_phantoms, cfg or small_config(), cache, vqgan_hash, torch.device("cpu")
        )
        return got, len(calls)

    first, n = encode()
    assert n == 3
    return encode, cache, first


def _data_offset(cache) -> int:
    """Where the tensor bytes start: after the 8-byte header length and the JSON header."""
    return 8 + int.from_bytes(cache.read_bytes()[:8], "little")


def test_the_cache_records_its_inputs_and_the_hash_of_its_content(encoded):
    encode, cache, first = encoded
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == mod.LATENTS_FORMAT and meta["vqgan_hash"] == "vq-hash-1"
    assert len(meta["data_hash"]) == 64 and len(meta["condition"]) == 64 and len(json.loads(meta["ids"])) == 3
    assert meta["content_hash"] == mod.latents_hash(first)
    got, n = encode()
    assert n == 0 and all(torch.equal(got[k], first[k]) for k in first)  # reused as it is


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_flipped_bit_is_encoded_again_with_one_line_and_never_used(encoded, capfd, where):
    encode, cache, first = encoded
    blob = bytearray(cache.read_bytes())
    # a bit of the first tensor's exponent (1.25e36 in the report), or the JSON header's opening brace
    at = _data_offset(cache) + 3 if where == "data" else 8
    blob[at] ^= 0x40
    cache.write_bytes(bytes(blob))
    capfd.readouterr()
    got, n = encode()
    err = capfd.readouterr().err
    assert n == 3 and all(torch.equal(got[k], first[k]) for k in first)
    why = "is damaged (its content does not match its recorded hash)" if where == "data" else "cannot be read"
    assert err.count("\n") == 1 and f"diffusion: the latent cache {cache} {why}" in err, err
    assert "encoding the dataset again" in err
    assert got["latent"].abs().max() <= 1 + 1e-5  # latent_norm's std stays that of real latents
    _, n = encode()
    assert n == 0  # the cache written again is trusted again


def test_other_inputs_are_encoded_again_and_the_line_names_them(encoded, capfd):
    encode, cache, first = encoded
    capfd.readouterr()
    _, n = encode(vqgan_hash="vq-hash-2")
    err = capfd.readouterr().err
    assert n == 3 and err.count("\n") == 1
    assert f"the latent cache {cache} was encoded from other inputs (VQ-GAN checkpoint)" in err
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    # A cache of an earlier lad-fast (no content hash, no format) is encoded again, not trusted.
    old = {k: meta[k] for k in meta if k not in ("format", "content_hash")}
    from safetensors.torch import save_file

    save_file(first, str(cache), metadata=old)
    capfd.readouterr()
    _, n = encode(vqgan_hash="vq-hash-2")
    assert n == 3 and "was encoded from other inputs (cache format)" in capfd.readouterr().err


def test_the_content_hash_covers_names_dtypes_shapes_and_values():
    base = {"latent": torch.zeros(2, 3), "content": torch.ones(2, 3)}
    digest = mod.latents_hash(base)
    assert digest == mod.latents_hash({"content": torch.ones(2, 3), "latent": torch.zeros(2, 3)})
    assert digest != mod.latents_hash({**base, "latent": torch.zeros(3, 2)})
    assert digest != mod.latents_hash({**base, "latent": torch.zeros(2, 3, dtype=torch.float64)})
    assert digest != mod.latents_hash({"latents": torch.zeros(2, 3), "content": torch.ones(2, 3)})
    flipped = torch.zeros(2, 3)
    flipped.view(torch.int32)[0, 0] = 1  # one bit
    assert digest != mod.latents_hash({**base, "latent": flipped})
