"""Training the conditional latent diffusion model (Lad phase 2); :mod:`lad_fast.runs.loading` loads it back.

Pipeline of :func:`train_diffusion`:

1. the frozen VQ-GAN of a trained run encodes every case of a prepared dataset once; the result is
   cached in ``<run>/diffusion/latents.safetensors`` keyed by the VQ-GAN checkpoint hash, the dataset's
   content hash (``PreparedDataset.content_hash``), the condition config and its ``spatial`` mode, so a
   second call (or ``--resume``) skips the encoder:
   image latents ``to_unit`` -> [-1, 1] (Lad scales by the codebook's min and max), the content encoding
   of each mask (``encode_pre_quant`` of :func:`lad_fast.runs.loading.mask_as_image`, as Lad passes the label
   map through the encoder), the normalised structure vector and, with spatial conditioning
   (``condition.spatial`` not "none"), the spatial condition (the mask's organ fractions on the latent grid);
2. :class:`LatentBatches` draws batches and the classifier-free-guidance dropout as a pure function of
   (seed, step, rank), so a resumed run reaches the same weights;
3. :func:`lad_fast.train.loop.train` runs the steps with ``{"model": LatentUNet}`` (the content head is
   part of the U-Net and trains jointly) and EMA weights, which :func:`lad_fast.runs.loading.load_diffusion`
   returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lad_fast.config import LadConfig, config_to_dict
from lad_fast.errors import CheckpointError, InputError
from lad_fast.models.unet import build_unet
from lad_fast.runs.loading import (
    check_vqgan_run,
    checkpoint_hash,
    encode_case,
    latent_norm,
    load_frozen_vqgan,
    normalize_latents,
    vqgan_reference,
)
from lad_fast.train.data import how_to_add_masks
from lad_fast.train.loop import TrainResult

MODEL = "diffusion"
LATENTS_NAME = "latents.safetensors"


# ------------------------------------------------------------------------------------------ latents


def _data_hash(data: Path) -> str:
    from lad_fast.data.prepared import PreparedDataset

    return PreparedDataset(data).content_hash()


def encode_dataset(
    vq: Any, data: Path, cfg: LadConfig, cache: Path, vqgan_hash: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """Encode every masked case of the prepared dataset ``data`` (cached in ``cache``).

    Returns ``latent`` (N, C, d, h, w), ``content`` (N, C, d, h, w), ``structure`` (N, L) float32 tensors,
    and ``spatial`` (N, K, d, h, w) with spatial conditioning (K:
    :func:`lad_fast.conditioning.conditions.spatial_channels`).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lad_fast.data.prepared import PreparedDataset
    from lad_fast.runs.checkpoints import config_hash
    from lad_fast.utils.atomic import atomic_path
    from lad_fast.utils.progress import track

    ds = PreparedDataset(data, expect_preset=cfg.preset)
    if config_to_dict(ds.geometry) != config_to_dict(cfg.geometry):
        raise InputError(f"{data}: prepared at another geometry than preset {cfg.preset!r}; re-prepare it")
    cases = ds.labelled_indices()
    if not cases:
        raise InputError(
            f"{data}: no case has a mask, and the diffusion model is conditioned on masks; "
            + how_to_add_masks(data)
        )
    key = {
        "vqgan_hash": vqgan_hash,
        "data_hash": ds.content_hash(),
        "condition": config_hash(config_to_dict(cfg.condition)),
        "ids": json.dumps([ds.case_ids[i] for i in cases]),
        "spatial": cfg.condition.spatial,
    }
    names = ("latent", "content", "structure") + (("spatial",) if cfg.condition.spatial != "none" else ())
    if cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:
                if f.metadata() == key:
                    return {k: f.get_tensor(k) for k in names}
        except Exception:  # a damaged cache is recomputed, never trusted
            pass
    rows = [
        encode_case(vq, ds[i]["image"], ds[i]["mask"], cfg, device) for i in track(cases, "encode latents")
    ]
    tensors = {k: torch.stack([r[k] for r in rows]).contiguous() for k in names}
    with atomic_path(cache, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=key)
    return tensors


@dataclass
class LatentBatches:
    """``batches(step, rank, world)`` over cached latents: a pure function of its arguments.

    Returns CPU tensors ``x0`` (B, C, d, h, w), ``content`` (B, C, d, h, w), ``structure`` (B, L), ``keep``
    (B,) 1.0 where the condition is kept and 0.0 where classifier-free guidance drops it (probability
    ``drop_prob``), and ``seed``, the seed of the step's timestep and noise draw. When the latents hold
    ``spatial`` (spatial conditioning), also ``spatial`` (B, K, d, h, w) with the same dropout already
    applied: the null (zeros, :func:`lad_fast.conditioning.conditions.drop_spatial`) where ``keep`` is 0.
    """

    latents: Mapping[str, torch.Tensor]
    batch_size: int
    seed: int
    drop_prob: float

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        from lad_fast.utils.distributed import shard_indices, step_generator

        n = self.latents["latent"].shape[0]
        idx = torch.tensor(shard_indices(n, self.batch_size, self.seed, step, rank, world))
        g = step_generator(self.seed, step, rank)
        keep = (torch.rand(self.batch_size, generator=g) >= self.drop_prob).float()
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        out = {
            "x0": self.latents["latent"][idx],
            "content": self.latents["content"][idx],
            "structure": self.latents["structure"][idx],
            "keep": keep,
            "seed": seed,
        }
        if "spatial" in self.latents:  # dropped with the global condition: one keep flag per sample
            from lad_fast.conditioning.conditions import drop_spatial

            out["spatial"] = drop_spatial(self.latents["spatial"][idx], keep)
        return out


# ------------------------------------------------------------------------------------------ training


def _model_config(cfg: LadConfig, latent_channels: int, structure_dim: int) -> dict[str, Any]:
    return {
        "unet": config_to_dict(cfg.unet),
        "condition": config_to_dict(cfg.condition),
        "diffusion": config_to_dict(cfg.diffusion),
        "latent_channels": latent_channels,
        "structure_dim": structure_dim,
    }


def train_diffusion(
    run: Path,
    cfg: LadConfig,
    data: Path | None = None,
    vqgan_run: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    stop_at: int | None = None,
) -> TrainResult:
    """Train the conditional latent U-Net of ``cfg`` into ``run/diffusion/``.

    data: a prepared dataset with masks (default: the built-in phantoms of ``cfg.preset``).
    vqgan_run: the run holding the trained VQ-GAN (default: ``run``); it must match ``cfg``'s preset,
        geometry and VQ-GAN config (CheckpointError otherwise). It stays frozen.
    steps: overrides ``cfg.diffusion_train.steps``. resume / force / device / stop_at: see
    ``lad_fast.train.loop``.
    """
    from lad_fast.conditioning.conditions import structure_dim as structure_len
    from lad_fast.data.cache import phantom_dataset
    from lad_fast.diffusion.schedules import diffusion_loss, make_schedule
    from lad_fast.train.loop import Job, Phase, Setup, train
    from lad_fast.train.schedule import make_adamw

    run = Path(run)
    vqgan_run = Path(vqgan_run) if vqgan_run is not None else run
    tcfg = replace(cfg.diffusion_train, steps=steps) if steps is not None else cfg.diffusion_train
    check_vqgan_run(vqgan_run, cfg)  # before anything is written or encoded

    def build(setup: Setup) -> Job:
        dev = setup.device
        data_path = Path(data) if data is not None else phantom_dataset(cfg.preset)
        vq, _ = load_frozen_vqgan(vqgan_run, cfg, dev)
        vq_hash = checkpoint_hash(vqgan_run / "vqgan")
        cache = setup.run.model_dir(MODEL) / LATENTS_NAME
        # Rank 0 encodes and writes the cache; the other ranks then read it.
        latents = setup.main_first(lambda: encode_dataset(vq, data_path, cfg, cache, vq_hash, dev))
        norm = latent_norm(latents["latent"], cfg.diffusion.latent_norm)
        latents = {**latents, "latent": normalize_latents(latents["latent"], norm)}
        latent_channels, struct_dim = latents["latent"].shape[1], latents["structure"].shape[1]
        if struct_dim != structure_len(cfg.geometry.shape[0], cfg.condition):  # defensive: a foreign cache
            raise CheckpointError(f"{cache}: structure vectors of {struct_dim} values do not fit the config")

        with setup.initial_weights():
            net = build_unet(cfg.unet, cfg.condition, latent_channels, struct_dim).to(dev)
        sched = make_schedule(cfg.diffusion).to(dev)
        opt = make_adamw(net, tcfg)  # a frozen content head (train_content off) stays as built

        def loss(mods: Mapping[str, torch.nn.Module], batch: dict[str, Any], step: int):
            b = {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            # The embedding runs on the bare module (it is not part of forward); DDP still reduces its
            # gradients, as every parameter gets one each step (the null embedding through keep).
            emb = net.embed_condition(b["content"], b["structure"], b["keep"])
            model = mods["model"]
            spatial = (b["spatial"],) if "spatial" in b else ()  # already null where keep is 0
            value = diffusion_loss(
                lambda x, t: model(x, t, emb, *spatial),
                b["x0"],
                sched,
                cfg.diffusion,
                generator=torch.Generator().manual_seed(batch["seed"]),
            )
            return value, {"kept": b["keep"].mean()}

        meta = {
            "preset": cfg.preset,
            "data_hash": _data_hash(data_path),
            "data": str(data_path.resolve()),
            "vqgan_run": vqgan_reference(run, vqgan_run),  # relative: the run folder can move
            "vqgan_hash": vq_hash,
            "latent_scale": list(vq.latent_scale()),
            "latent_shape": list(latents["latent"].shape[1:]),
            "latent_norm": norm,
            "structure_dim": struct_dim,
            "cases": int(latents["latent"].shape[0]),
        }
        return Job(
            {"model": net},
            [Phase("model", opt, loss)],
            LatentBatches(latents, tcfg.batch_size, tcfg.seed, cfg.condition.drop_prob),
            model_config=_model_config(cfg, latent_channels, struct_dim),
            meta=meta,
        )

    return train(run, cfg, MODEL, tcfg, build, resume=resume, force=force, device=device, stop_at=stop_at)
