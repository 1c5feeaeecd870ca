"""Training the conditional latent diffusion model (Lad phase 2) and loading it back for sampling.

Pipeline of :func:`train_diffusion`:

1. the frozen VQ-GAN of a trained run encodes every case of a prepared dataset once; the result is
   cached in ``<run>/diffusion/latents.safetensors`` keyed by the VQ-GAN checkpoint hash, the dataset's
   ``index.json`` hash and the condition config, so a second call (or ``--resume``) skips the encoder:
   image latents ``to_unit`` -> [-1, 1] (Lad scales by the codebook's min and max), the content encoding
   of each mask (``encode_pre_quant`` of :func:`mask_as_image`, as Lad passes the label map through the
   encoder) and the normalised structure vector;
2. :class:`LatentBatches` draws batches and the classifier-free-guidance dropout as a pure function of
   (seed, step, rank), so a resumed run reaches the same weights;
3. :func:`lad_fast.train.loop.train` runs the steps with ``{"model": LatentUNet}`` (the content head is
   part of the U-Net and trains jointly) and EMA weights, which :func:`load_diffusion` returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.config import LadConfig, config_from_dict, config_to_dict
from lad_fast.data.labels import NUM_CLASSES
from lad_fast.errors import CheckpointError, ConfigError, InputError
from lad_fast.models.unet import LatentUNet
from lad_fast.train.loop import TrainResult

MODEL = "diffusion"
LATENTS_NAME = "latents.safetensors"
# Config sections a VQ-GAN run must share with the diffusion run that uses its latents.
_VQGAN_SECTIONS = ("preset", "geometry", "vqgan")


def mask_as_image(mask: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Render a label map as a one-channel image for the VQ-GAN encoder (Lad's content condition).

    mask (B, D, H, W) integer canonical ids -> (B, 1, D, H, W) float32, id k at ``2 k / (K - 1) - 1``:
    background at -1 (air, as in the CT images), the last canonical id at +1, ids evenly spaced so the
    encoder sees every organ as its own grey level.
    """
    if mask.is_floating_point() or mask.ndim != 4:
        raise InputError(
            f"mask_as_image needs integer labels (B, D, H, W), got {mask.dtype} {tuple(mask.shape)}"
        )
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
        raise InputError(
            f"mask labels must lie in 0..{num_classes - 1} (canonical ids), "
            f"got {int(mask.min())}..{int(mask.max())}"
        )
    return (mask.float() * (2.0 / (num_classes - 1)) - 1.0)[:, None]


def checkpoint_hash(model_dir: Path) -> str:
    """Short hash of the latest checkpoint in ``model_dir``: its files' SHA-256, as ``meta.json`` lists them.

    Cheap (no weights are read) and changes whenever any weight file changes.
    """
    from lad_fast.train.checkpoint import META_NAME, latest_step_dir

    step_dir = latest_step_dir(model_dir)
    if step_dir is None:
        raise CheckpointError(f"{model_dir}: no complete checkpoint")
    try:
        files = json.loads((step_dir / META_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{step_dir / META_NAME} is unreadable ({err}); the checkpoint is damaged"
        ) from err
    blob = json.dumps(files, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ VQ-GAN


def check_vqgan_run(vqgan_run: Path, cfg: LadConfig) -> None:
    """Raise CheckpointError unless ``vqgan_run`` holds a complete VQ-GAN trained at ``cfg``'s geometry."""
    from lad_fast.runs import RunDir, config_diff
    from lad_fast.train.checkpoint import latest_step_dir

    vqgan_run = Path(vqgan_run)
    if not (vqgan_run / "config.json").is_file():
        raise CheckpointError(
            f"{vqgan_run} is not a lad-fast run (no config.json); train a VQ-GAN first with "
            f"`lad-fast train vqgan --run {vqgan_run}` or pass --vqgan RUN"
        )
    if latest_step_dir(vqgan_run / "vqgan") is None:
        raise CheckpointError(
            f"run {vqgan_run} has no trained VQ-GAN (no complete checkpoint in {vqgan_run / 'vqgan'}); "
            f"train one with `lad-fast train vqgan --run {vqgan_run}` or pass --vqgan RUN"
        )
    theirs = RunDir.open(vqgan_run).config_dict()
    ours = config_to_dict(cfg)
    diff = config_diff(
        {k: theirs.get(k) for k in _VQGAN_SECTIONS},
        json.loads(json.dumps({k: ours[k] for k in _VQGAN_SECTIONS})),
    )
    if diff:
        raise CheckpointError(
            f"the VQ-GAN of run {vqgan_run} was trained with another preset or geometry "
            f"({'; '.join(diff[:4])}); use a VQ-GAN run of the same preset, or train one"
        )


def load_frozen_vqgan(vqgan_run: Path, cfg: LadConfig, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """(VQGAN in eval mode without gradients, its meta) after :func:`check_vqgan_run`."""
    from lad_fast.train.vqgan import load_vqgan

    check_vqgan_run(vqgan_run, cfg)
    vq, meta = load_vqgan(vqgan_run, device=device)
    vq.eval().requires_grad_(False)
    return vq, dict(meta)


# ------------------------------------------------------------------------------------------ latents


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@torch.no_grad()
def encode_case(
    vq: Any, image: np.ndarray | None, mask: np.ndarray, cfg: LadConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """Latents and conditions of one case, computed one sample at a time (batch-size independent).

    image (D, H, W) in [-1, 1] or None, mask (D, H, W) canonical ids -> ``latent`` (C, d, h, w) in [-1, 1]
    (absent without an image), ``content`` (C, d, h, w) and ``structure`` (L,) float32, log1p-normalised.
    """
    from lad_fast.conditions import normalize_structure, structure_condition

    m = torch.from_numpy(np.asarray(mask, dtype=np.int64))[None].to(device)
    out = {
        "content": vq.encode_pre_quant(mask_as_image(m))[0].float().cpu(),
        "structure": normalize_structure(structure_condition(np.asarray(mask), cfg.condition)),
    }
    if image is not None:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None].to(device)
        out["latent"] = vq.to_unit(vq.encode(x))[0].float().cpu()
    return out


def encode_dataset(
    vq: Any, data: Path, cfg: LadConfig, cache: Path, vqgan_hash: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """Encode every masked case of the prepared dataset ``data`` (cached in ``cache``).

    Returns ``latent`` (N, C, d, h, w), ``content`` (N, C, d, h, w), ``structure`` (N, L) float32 tensors.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lad_fast.atomic import atomic_path
    from lad_fast.data.prepared import INDEX, PreparedDataset
    from lad_fast.progress import track
    from lad_fast.train.checkpoint import config_hash

    ds = PreparedDataset(data, expect_preset=cfg.preset)
    if config_to_dict(ds.geometry) != config_to_dict(cfg.geometry):
        raise InputError(f"{data}: prepared at another geometry than preset {cfg.preset!r}; re-prepare it")
    cases = ds.labelled_indices()
    if not cases:
        raise InputError(
            f"{data}: no case has a mask; the diffusion model is conditioned on masks "
            "(prepare a labelled dataset or predict masks first)"
        )
    key = {
        "vqgan_hash": vqgan_hash,
        "data_hash": _file_hash(Path(data) / INDEX),
        "condition": config_hash(config_to_dict(cfg.condition)),
        "ids": json.dumps([ds.case_ids[i] for i in cases]),
    }
    if cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:
                if f.metadata() == key:
                    return {k: f.get_tensor(k) for k in ("latent", "content", "structure")}
        except Exception:  # a damaged cache is recomputed, never trusted
            pass
    rows = [
        encode_case(vq, ds[i]["image"], ds[i]["mask"], cfg, device) for i in track(cases, "encode latents")
    ]
    tensors = {k: torch.stack([r[k] for r in rows]).contiguous() for k in ("latent", "content", "structure")}
    with atomic_path(cache, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=key)
    return tensors


@dataclass
class LatentBatches:
    """``batches(step, rank, world)`` over cached latents: a pure function of its arguments.

    Returns CPU tensors ``x0`` (B, C, d, h, w), ``content`` (B, C, d, h, w), ``structure`` (B, L), ``keep``
    (B,) 1.0 where the condition is kept and 0.0 where classifier-free guidance drops it (probability
    ``drop_prob``), and ``seed``, the seed of the step's timestep and noise draw.
    """

    latents: Mapping[str, torch.Tensor]
    batch_size: int
    seed: int
    drop_prob: float

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        from lad_fast.train.distributed import shard_indices, step_generator

        n = self.latents["latent"].shape[0]
        idx = torch.tensor(shard_indices(n, self.batch_size, self.seed, step, rank, world))
        g = step_generator(self.seed, step, rank)
        keep = (torch.rand(self.batch_size, generator=g) >= self.drop_prob).float()
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return {
            "x0": self.latents["latent"][idx],
            "content": self.latents["content"][idx],
            "structure": self.latents["structure"][idx],
            "keep": keep,
            "seed": seed,
        }


# ------------------------------------------------------------------------------------- latent norm


def latent_norm(latents: torch.Tensor, mode: str) -> dict[str, list[float]]:
    """Per-channel mean and std of unit-scaled latents (N, C, d, h, w) for ``mode`` "channel", or the
    identity (0, 1) for "none". Stored in the checkpoint's meta so sampling inverts it exactly."""
    c = latents.shape[1]
    if mode == "none":
        return {"mean": [0.0] * c, "std": [1.0] * c}
    if mode != "channel":
        raise ConfigError(f"diffusion.latent_norm must be 'channel' or 'none', got {mode!r}")
    dims = (0, *range(2, latents.ndim))
    std = latents.double().std(dim=dims).clamp_min(1e-3)
    return {"mean": latents.double().mean(dim=dims).tolist(), "std": std.tolist()}


def _norm_tensors(
    norm: Mapping[str, Sequence[float]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1) + (1,) * (like.ndim - 2)
    mean = torch.tensor(norm["mean"], dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(norm["std"], dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def normalize_latents(latents: torch.Tensor, norm: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """Unit-scaled latents -> what the diffusion model sees: (latents - mean) / std per channel."""
    mean, std = _norm_tensors(norm, latents)
    return (latents - mean) / std


def denormalize_latents(x: torch.Tensor, norm: Mapping[str, Sequence[float]] | None) -> torch.Tensor:
    """Inverse of :func:`normalize_latents` (the identity for runs trained before latent_norm)."""
    if norm is None:
        return x
    mean, std = _norm_tensors(norm, x)
    return x * std + mean


def clip_bounds(
    norm: Mapping[str, Sequence[float]] | None, like: torch.Tensor
) -> bool | tuple[torch.Tensor, torch.Tensor]:
    """The sampler's x0 bounds: [-1, 1] in unit-scaled latent space, mapped through the normalisation."""
    if norm is None:
        return True
    mean, std = _norm_tensors(norm, like)
    return (-1 - mean) / std, (1 - mean) / std


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
    from lad_fast.conditions import structure_dim as structure_len
    from lad_fast.data.cache import phantom_dataset
    from lad_fast.diffusion import diffusion_loss, make_schedule
    from lad_fast.train.loop import Job, Phase, Setup, train

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
            net = LatentUNet(cfg.unet, cfg.condition, latent_channels, struct_dim).to(dev)
        sched = make_schedule(cfg.diffusion).to(dev)
        opt = torch.optim.AdamW(
            net.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay
        )

        def loss(mods: Mapping[str, torch.nn.Module], batch: dict[str, Any], step: int):
            b = {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            # The embedding runs on the bare module (it is not part of forward); DDP still reduces its
            # gradients, as every parameter gets one each step (the null embedding through keep).
            emb = net.embed_condition(b["content"], b["structure"], b["keep"])
            model = mods["model"]
            value = diffusion_loss(
                lambda x, t: model(x, t, emb),
                b["x0"],
                sched,
                cfg.diffusion,
                generator=torch.Generator().manual_seed(batch["seed"]),
            )
            return value, {"kept": b["keep"].mean()}

        meta = {
            "preset": cfg.preset,
            "data_hash": _file_hash(data_path / "index.json"),
            "data": str(data_path.resolve()),
            "vqgan_run": str(vqgan_run.resolve()),
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


def load_diffusion(run: Path, device: str | torch.device = "cpu") -> tuple[LatentUNet, dict[str, Any]]:
    """The trained denoiser of ``run`` with its EMA weights (eval mode), and its checkpoint meta.

    meta: the checkpoint's ``meta.json`` with the training entries (``vqgan_run``, ``vqgan_hash``,
    ``latent_scale``, ``structure_dim``, ``data`` ...) lifted to the top level, plus ``checkpoint_hash``
    and ``checkpoint`` (the step folder).
    """
    from lad_fast.devices import resolve_device
    from lad_fast.runs import RunDir
    from lad_fast.train.checkpoint import load_checkpoint

    run = Path(run)
    RunDir.open(run)
    ckpt = load_checkpoint(run / MODEL, MODEL)
    if ckpt is None:
        raise CheckpointError(
            f"run {run} has no trained diffusion model (no checkpoint in {run / MODEL}); "
            f"train one with `lad-fast train diffusion --run {run}`"
        )
    mc = ckpt.meta.get("model_config", {})
    try:
        part = config_from_dict(
            {"unet": mc["unet"], "condition": mc["condition"], "diffusion": mc["diffusion"]}
        )
        net = LatentUNet(part.unet, part.condition, int(mc["latent_channels"]), int(mc["structure_dim"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path / 'meta.json'}: no usable model_config ({err})") from err
    stem = "ema" if ckpt.has("ema") else "model"
    try:
        net.load_state_dict(ckpt.tensors(stem), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{ckpt.path / (stem + '.safetensors')} does not fit the U-Net ({first})"
        ) from err
    meta = {**ckpt.meta, **(ckpt.meta.get("extra") or {})}
    meta["checkpoint"] = str(ckpt.path)
    meta["checkpoint_hash"] = checkpoint_hash(run / MODEL)
    meta["diffusion_config"] = part.diffusion
    return net.to(resolve_device(device)).eval().requires_grad_(False), meta
