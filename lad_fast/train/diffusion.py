"""Training the conditional latent diffusion model (Lad phase 2); :mod:`lad_fast.runs.loading` loads it back.

Pipeline of :func:`train_diffusion`:

1. the frozen VQ-GAN of a trained run encodes every case of a prepared dataset once; the result is
   cached in ``<run>/diffusion/latents.safetensors``, which records its inputs (the VQ-GAN checkpoint
   hash, the dataset's content hash ``PreparedDataset.content_hash``, the condition config, its
   ``spatial`` mode and the case ids) and the hash of its own content (:func:`latents_hash`). A second
   call (or ``--resume``) skips the encoder when both agree, and encodes again, with one line saying
   why, when either does not (a damaged cache never reaches training):
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lad_fast.config import DiffusionConfig, LadConfig, TrainConfig, config_to_dict
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import CheckpointError, InputError
from lad_fast.models.unet import LatentUNet, build_unet
from lad_fast.models.vqgan import VQGAN
from lad_fast.runs.loading import (
    check_vqgan_run,
    encode_case,
    latent_norm,
    load_vqgan,
    normalize_latents,
    vqgan_reference,
)
from lad_fast.train.data import how_to_add_masks, training_dataset
from lad_fast.train.loop import Job, Phase, Setup, TrainResult, train
from lad_fast.train.schedule import make_adamw

MODEL = "diffusion"
LATENTS_NAME = "latents.safetensors"
# Part of a cache's recorded inputs: a cache written before its content was hashed is encoded again.
LATENTS_FORMAT = "lad-fast latents v2"
_INPUT_NAMES = {
    "format": "cache format",
    "vqgan_hash": "VQ-GAN checkpoint",
    "data_hash": "data",
    "condition": "condition config",
    "ids": "cases",
    "spatial": "spatial conditioning",
}


# ------------------------------------------------------------------------------------------ latents


def latents_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a latent cache, by name: each one's name, dtype, shape and bytes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_cache(
    cache: Path, key: Mapping[str, str], names: tuple[str, ...]
) -> dict[str, torch.Tensor] | None:
    """The tensors of ``cache`` when it was encoded from the inputs ``key`` and its content matches its
    recorded hash; otherwise None, after one line saying why it is encoded again."""
    from safetensors import safe_open

    from lad_fast.utils.progress import say

    if not cache.is_file():
        return None
    why = None
    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
            differ = [_INPUT_NAMES[k] for k in key if meta.get(k) != key[k]]
            tensors = {k: f.get_tensor(k) for k in names} if not differ else None
    except Exception as exc:  # safetensors raises several types for a damaged header
        why = f"cannot be read ({type(exc).__name__})"
    else:
        if differ:
            why = f"was encoded from other inputs ({', '.join(differ)})"
        elif latents_hash(tensors) != meta.get("content_hash"):
            why = "is damaged (its content does not match its recorded hash)"
    if why is not None:
        say(f"{MODEL}: the latent cache {cache} {why}; encoding the dataset again")
        return None
    return tensors


def encode_dataset(
    vq: Any,
    data: PreparedDataset | Path,
    cfg: LadConfig,
    cache: Path,
    vqgan_hash: str,
    device: torch.device,
    data_hash: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encode every masked case of the prepared dataset ``data`` (open, or a folder) with ``vq``, cached in
    ``cache`` with its inputs (``vqgan_hash``, ``data_hash`` (default: ``data``'s content hash), the
    condition config and the case ids) and the hash of its content; a cache that disagrees with either
    is encoded again (:func:`_read_cache`).

    Returns ``latent`` (N, C, d, h, w), ``content`` (N, C, d, h, w), ``structure`` (N, L) float32 tensors,
    and ``spatial`` (N, K, d, h, w) with spatial conditioning (K:
    :func:`lad_fast.conditioning.conditions.spatial_channels`).
    """
    from safetensors.torch import save_file

    from lad_fast.runs.checkpoints import config_hash
    from lad_fast.utils.atomic import atomic_path
    from lad_fast.utils.progress import track

    ds = training_dataset(data, cfg)
    if config_to_dict(ds.geometry) != config_to_dict(cfg.geometry):
        raise InputError(f"{ds.path}: prepared at another geometry than preset {cfg.preset!r}; re-prepare it")
    cases = ds.labelled_indices()
    if not cases:
        raise InputError(
            f"{ds.path}: no case has a mask, and the diffusion model is conditioned on masks; "
            + how_to_add_masks(ds.path)
        )
    key = {
        "format": LATENTS_FORMAT,
        "vqgan_hash": vqgan_hash,
        "data_hash": data_hash if data_hash is not None else ds.content_hash(),
        "condition": config_hash(config_to_dict(cfg.condition)),
        "ids": json.dumps([ds.case_ids[i] for i in cases]),
        "spatial": cfg.condition.spatial,
    }
    names = ("latent", "content", "structure") + (("spatial",) if cfg.condition.spatial != "none" else ())
    cached = _read_cache(cache, key, names)
    if cached is not None:
        return cached
    rows = [
        encode_case(vq, ds[i]["image"], ds[i]["mask"], cfg, device) for i in track(cases, "encode latents")
    ]
    tensors = {k: torch.stack([r[k] for r in rows]).contiguous() for k in names}
    with atomic_path(cache, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={**key, "content_hash": latents_hash(tensors)})
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


@dataclass(frozen=True)
class _DiffusionLoss:
    """The denoiser's phase loss, ``loss(modules, batch, step)``: the diffusion objective of ``cfg``
    (:func:`lad_fast.diffusion.schedules.diffusion_loss`) under the batch's conditions, with the batch's
    seed drawing the timesteps and noise."""

    net: LatentUNet  # the bare module, for the condition embedding
    schedule: Any
    cfg: DiffusionConfig
    device: torch.device

    def __call__(self, mods: Mapping[str, torch.nn.Module], batch: dict[str, Any], step: int):
        from lad_fast.diffusion.schedules import diffusion_loss

        b = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        # The embedding runs on the bare module (it is not part of forward); DDP still reduces its
        # gradients, as every parameter gets one each step (the null embedding through keep).
        emb = self.net.embed_condition(b["content"], b["structure"], b["keep"])
        model = mods["model"]
        spatial = (b["spatial"],) if "spatial" in b else ()  # already null where keep is 0
        value = diffusion_loss(
            lambda x, t: model(x, t, emb, *spatial),
            b["x0"],
            self.schedule,
            self.cfg,
            generator=torch.Generator().manual_seed(batch["seed"]),
        )
        return value, {"kept": b["keep"].mean()}


@dataclass(frozen=True)
class _Sources:
    """What the denoiser learns from: the prepared dataset and its content hash, and the run holding the
    frozen VQ-GAN (``vqgan_run``, recorded relative to ``run``)."""

    run: Path
    vqgan_run: Path
    dataset: PreparedDataset
    data_hash: str


def _latents(setup: Setup, cfg: LadConfig, vq: VQGAN, vq_hash: str, src: _Sources):
    """(the dataset's latents and conditions with the latents normalised, the normalisation). Rank 0
    encodes them and writes the cache in ``run/diffusion/``; the other ranks then read it."""
    from lad_fast.conditioning.conditions import structure_dim

    cache = setup.run.model_dir(MODEL) / LATENTS_NAME
    latents = setup.main_first(
        lambda: encode_dataset(vq, src.dataset, cfg, cache, vq_hash, setup.device, src.data_hash)
    )
    norm = latent_norm(latents["latent"], cfg.diffusion.latent_norm)
    latents = {**latents, "latent": normalize_latents(latents["latent"], norm)}
    struct_dim = latents["structure"].shape[1]
    if struct_dim != structure_dim(cfg.geometry.shape[0], cfg.condition):  # defensive: a foreign cache
        raise CheckpointError(f"{cache}: structure vectors of {struct_dim} values do not fit the config")
    return latents, norm


def _diffusion_job(setup: Setup, cfg: LadConfig, tcfg: TrainConfig, src: _Sources) -> Job:
    """What the loop trains: the conditional latent U-Net (initial weights from the seed) with AdamW, on
    batches of the cached latents, and the ``meta.json`` entries sampling reads."""
    from lad_fast.diffusion.schedules import make_schedule

    dev = setup.device
    vq, vq_meta = load_vqgan(src.vqgan_run, device=dev)  # checked by train_diffusion
    vq_hash = vq_meta["checkpoint_hash"]
    latents, norm = _latents(setup, cfg, vq, vq_hash, src)
    latent_channels, struct_dim = latents["latent"].shape[1], latents["structure"].shape[1]
    with setup.initial_weights():
        net = build_unet(cfg.unet, cfg.condition, latent_channels, struct_dim).to(dev)
    loss = _DiffusionLoss(net, make_schedule(cfg.diffusion).to(dev), cfg.diffusion, dev)
    opt = make_adamw(net, tcfg)  # a frozen content head (train_content off) stays as built
    meta = {
        "preset": cfg.preset,
        "data_hash": src.data_hash,
        "data": str(src.dataset.path.resolve()),
        "vqgan_run": vqgan_reference(src.run, src.vqgan_run),  # relative: the run folder can move
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


def train_diffusion(
    run: Path,
    cfg: LadConfig,
    data: PreparedDataset | Path | None = None,
    vqgan_run: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    stop_at: int | None = None,
    batch: int | None = None,
) -> TrainResult:
    """Train the conditional latent U-Net of ``cfg`` into ``run/diffusion/``.

    data: a prepared dataset with masks, open or a folder (default: the built-in phantoms of
        ``cfg.preset``; :func:`lad_fast.train.data.training_dataset`).
    vqgan_run: the run holding the trained VQ-GAN (default: ``run``); it must match ``cfg``'s preset,
        geometry and VQ-GAN config (CheckpointError otherwise), checked before the data is opened. It
        stays frozen.
    steps, batch: override ``cfg.diffusion_train.steps`` and ``batch_size``. resume / force / device /
    stop_at: see ``lad_fast.train.loop``.
    """
    run = Path(run)
    vqgan_run = Path(vqgan_run) if vqgan_run is not None else run
    tcfg = cfg.diffusion_train.overridden(steps, batch)
    check_vqgan_run(vqgan_run, cfg)  # before anything is written or encoded
    dataset = training_dataset(data, cfg)
    src = _Sources(run, vqgan_run, dataset, dataset.content_hash())
    build = partial(_diffusion_job, cfg=cfg, tcfg=tcfg, src=src)
    return train(run, cfg, MODEL, tcfg, build, resume=resume, force=force, device=device, stop_at=stop_at)
