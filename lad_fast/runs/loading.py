"""Loading a trained run: its three models, checkpoint hashes, latent encoding and normalisation.

This layer sits below both training (``lad_fast.train``) and everything that uses trained weights
(``lad_fast.generate``, ``lad_fast.export``, ``lad_fast.evaluate``, ``bench/``), so none of those needs the
trainers; it imports nothing from ``lad_fast.train`` (tests/test_imports.py checks it).

* :func:`load_vqgan`, :func:`load_diffusion`, :func:`load_segmenter` share one loader shape
  (:func:`_load`): open the run, load the latest verified checkpoint of the model, build the module from
  the checkpoint's ``model_config``, load the EMA weights when the checkpoint has them (else the raw
  ones) and return ``(module in eval mode without gradients, meta)``. The meta follows one rule:
  ``{**meta.json, **meta.json["extra"]}`` (the training entries ``latent_scale``, ``vqgan_run``,
  ``organs`` ... lifted to the top level; ``extra`` itself stays) plus ``checkpoint`` (the step folder)
  and ``checkpoint_hash`` (:func:`checkpoint_hash`). A model may add entries of its own, documented on
  its loader. Each takes a run folder or a :class:`~lad_fast.runs.rundir.RunDir` already opened, so a
  caller that loads several models of one run opens it, and parses its config, once.
* :func:`load_sampling_models`: the diffusion model of a run and the frozen VQ-GAN it was trained on, in
  one pass (what generation and export load).
* :func:`encode_case` turns one case into the latents and conditions the diffusion model sees;
  :func:`latent_norm` / :func:`normalize_latents` / :func:`denormalize_latents` / :func:`clip_bounds`
  are the per-channel latent normalisation stored in the diffusion checkpoint and its inverse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lad_fast.config import LadConfig, config_from_dict, config_to_dict
from lad_fast.errors import CheckpointError, ConfigError, InputError
from lad_fast.models.segmenter import Segmenter
from lad_fast.models.unet import LatentUNet, build_unet
from lad_fast.models.vqgan import VQGAN
from lad_fast.organs import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.runs.checkpoints import META_NAME, digest_hash, latest_step_dir, load_checkpoint
from lad_fast.runs.rundir import RunDir, config_diff

# Config sections a VQ-GAN run must share with the diffusion run that uses its latents.
VQGAN_SECTIONS = ("preset", "geometry", "vqgan")
PREDICT_BATCH = 4  # oneDNN's 3D convolutions are several times slower per case at batch 1 than at 4


# ------------------------------------------------------------------------------------- checkpoints


def checkpoint_hash(model_dir: Path) -> str:
    """Short content hash of the latest checkpoint in ``model_dir``
    (:func:`~lad_fast.runs.checkpoints.digest_hash`): it covers every file of the step, ``meta.json``
    (latent normalisation, model config) as well as the weights.

    Cheap (no weights are read); loading the checkpoint checks that its files match it.
    """
    step_dir = latest_step_dir(model_dir)
    if step_dir is None:
        raise CheckpointError(f"{model_dir}: no complete checkpoint")
    return digest_hash(step_dir)


# ------------------------------------------------------------------------------------------ loaders

# A run folder, or one already opened (its config parsed once for every loader that reads it).
RunLike = str | os.PathLike[str] | RunDir
# build(model_config, meta, rundir) -> module with freshly initialised weights; it may add its own
# entries to meta (what it parsed from model_config, say), which the loader returns
Build = Callable[[Mapping[str, Any], dict[str, Any], RunDir], nn.Module]


def open_run(run: RunLike) -> RunDir:
    """``run`` itself when it is an opened :class:`RunDir`, else :meth:`RunDir.open` of the folder."""
    return run if isinstance(run, RunDir) else RunDir.open(run)


def _load(
    run: RunLike, model: str, what: str, build: Build, device: str | torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The one loader shape of the three models (see the module docstring)."""
    from lad_fast.utils.devices import resolve_device

    rundir = open_run(run)
    run = rundir.path
    model_dir = rundir.model_dir(model)
    ckpt = load_checkpoint(model_dir, model)  # verifies sizes and hashes
    if ckpt is None:
        raise CheckpointError(
            f"run {run} has no trained {what} (no complete checkpoint in {model_dir}); "
            f"train one with `lad-fast train {model} --run {run}`"
        )
    meta = {**ckpt.meta, **(ckpt.meta.get("extra") or {})}
    meta["checkpoint"] = str(ckpt.path)
    meta["checkpoint_hash"] = ckpt.content_hash
    try:
        module = build(ckpt.meta.get("model_config") or {}, meta, rundir)
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{ckpt.path / META_NAME}: no usable model_config ({err})") from err
    ckpt.load_module("ema" if ckpt.has("ema") else "model", module)
    return module.to(resolve_device(device)).eval().requires_grad_(False), meta


def _build_vqgan(mc: Mapping[str, Any], meta: dict[str, Any], rundir: RunDir) -> nn.Module:
    # parsed, a checkpoint of an older lad-fast takes the defaults of the fields added since
    trained = config_from_dict({"vqgan": dict(mc)}).vqgan
    diff = config_diff(config_to_dict(trained), config_to_dict(rundir.config().vqgan))
    if diff:
        raise CheckpointError(
            f"the VQ-GAN checkpoint {meta['checkpoint']} was trained with another model config than "
            f"{rundir.config_path} ({'; '.join(diff)}); the run folder is inconsistent: retrain with --force"
        )
    return VQGAN(trained)


def load_vqgan(run: RunLike, device: str | torch.device = "cpu") -> tuple[VQGAN, dict[str, Any]]:
    """The trained VQ-GAN of ``run`` and its meta (``latent_scale`` (min, max), ``heldout`` ...).

    CheckpointError when the run has no complete VQ-GAN checkpoint, when the checkpoint is damaged, or
    when its model config differs from the run's ``config.json``.
    """
    return _load(run, "vqgan", "VQ-GAN", _build_vqgan, device)  # type: ignore[return-value]


def _build_diffusion(mc: Mapping[str, Any], meta: dict[str, Any], rundir: RunDir) -> nn.Module:
    part = config_from_dict({"unet": mc["unet"], "condition": mc["condition"], "diffusion": mc["diffusion"]})
    meta["diffusion_config"] = part.diffusion  # the schedule and prediction type sampling must use
    return build_unet(part.unet, part.condition, int(mc["latent_channels"]), int(mc["structure_dim"]))


def load_diffusion(run: RunLike, device: str | torch.device = "cpu") -> tuple[LatentUNet, dict[str, Any]]:
    """The trained denoiser of ``run`` and its meta (``vqgan_run``, ``vqgan_hash``, ``latent_scale``,
    ``latent_shape``, ``latent_norm``, ``structure_dim``, ``data`` ...).

    Its own meta entry: ``diffusion_config``, the :class:`~lad_fast.config.DiffusionConfig` it was
    trained with (schedule and prediction type), which sampling must use.
    """
    net, meta = _load(run, "diffusion", "diffusion model", _build_diffusion, device)
    return net, meta  # type: ignore[return-value]


def _build_segmenter(mc: Mapping[str, Any], meta: dict[str, Any], rundir: RunDir) -> nn.Module:
    organs = meta.get("organs")
    # Output channels are organ ids: a net trained for another vocabulary would mean other organs.
    if organs != list(CANONICAL_ORGANS):
        raise CheckpointError(
            f"{meta['checkpoint']}: segmenter trained for the organ vocabulary {organs}, but this lad-fast "
            f"uses {list(CANONICAL_ORGANS)}; retrain it with `lad-fast train segmenter --run NEW_RUN`"
        )
    return Segmenter(config_from_dict({"segmenter": mc["segmenter"]}).segmenter, len(organs))


def load_segmenter(run: RunLike, device: str | torch.device = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """The trained organ segmenter of ``run`` and its meta (``organs``, ``held_out_cases`` ...).

    Its own meta entry: ``config``, the run's resolved config (dict), for the preset and geometry the
    segmenter expects. CheckpointError also when it was trained for another organ vocabulary than this
    lad-fast's :data:`~lad_fast.organs.CANONICAL_ORGANS`.
    """
    rundir = open_run(run)
    net, meta = _load(rundir, "segmenter", "segmenter", _build_segmenter, device)
    meta["config"] = rundir.config_dict()
    return net, meta  # type: ignore[return-value]


@torch.no_grad()
def predict_volumes(
    net: Segmenter, images: np.ndarray, device: torch.device | str, batch_size: int = PREDICT_BATCH
) -> np.ndarray:
    """Label maps of ``images`` (N, D, H, W) in [-1, 1] -> (N, D, H, W) uint8 canonical ids.

    Cases run ``batch_size`` at a time; the net is left in the mode it was in.
    """
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32))[:, None]
        out.append(net.predict(x.to(device)).cpu().numpy())
    net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, *np.shape(images)[1:]), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ VQ-GAN


def vqgan_reference(run: Path, vqgan_run: Path) -> str:
    """How a diffusion checkpoint of ``run`` records the run holding its VQ-GAN: relative to ``run``
    ("." for the run itself), so a run folder (or two runs moved together) can be copied or moved."""
    return os.path.relpath(Path(vqgan_run).resolve(), Path(run).resolve())


def vqgan_run_of(run: Path, meta: Mapping[str, Any]) -> Path:
    """The run holding the VQ-GAN the diffusion model of ``run`` (``meta``: its checkpoint's) was trained
    on: ``meta["vqgan_run"]`` relative to ``run``, or an absolute path (how early runs recorded it). An
    absolute path that does not exist falls back to ``run`` itself when its VQ-GAN has the recorded hash
    (a run moved or copied after training on its own VQ-GAN). CheckpointError naming options that exist
    when the VQ-GAN run is gone."""
    run = Path(run)
    ref = meta.get("vqgan_run")
    if not ref:
        return run
    path = Path(ref) if Path(ref).is_absolute() else run / ref
    if (path / "config.json").is_file():
        return path
    if Path(ref).is_absolute() and (run / "config.json").is_file() and latest_step_dir(run / "vqgan"):
        if meta.get("vqgan_hash") == checkpoint_hash(run / "vqgan"):
            return run
    raise CheckpointError(
        f"the diffusion model of {run} was trained on the VQ-GAN of run {path}, which is not there (moved or "
        f"deleted?); put that run back (recorded as {ref!r}), or retrain the diffusion model on a VQ-GAN "
        f"that exists: `lad-fast train diffusion --run {run} --vqgan VQGAN_RUN --force`"
    )


def check_vqgan_run(vqgan_run: RunLike, cfg: LadConfig) -> RunDir:
    """Raise CheckpointError unless ``vqgan_run`` holds a complete VQ-GAN trained at ``cfg``'s geometry;
    returns that run, opened."""
    opened = vqgan_run if isinstance(vqgan_run, RunDir) else None
    vqgan_run = opened.path if opened is not None else Path(vqgan_run)
    if not (vqgan_run / "config.json").is_file():
        raise CheckpointError(
            f"{vqgan_run} is not a lad-fast run (no config.json); train a VQ-GAN first with "
            f"`lad-fast train vqgan --run {vqgan_run}`, or point `lad-fast train diffusion --vqgan RUN` "
            "at another"
        )
    if latest_step_dir(vqgan_run / "vqgan") is None:
        raise CheckpointError(
            f"run {vqgan_run} has no trained VQ-GAN (no complete checkpoint in {vqgan_run / 'vqgan'}); "
            f"train one with `lad-fast train vqgan --run {vqgan_run}`, or point "
            "`lad-fast train diffusion --vqgan RUN` at another"
        )
    rundir = opened if opened is not None else RunDir.open(vqgan_run)
    theirs = rundir.config_dict()
    ours = config_to_dict(cfg)
    diff = config_diff(
        {k: theirs.get(k) for k in VQGAN_SECTIONS},
        json.loads(json.dumps({k: ours[k] for k in VQGAN_SECTIONS})),
    )
    if diff:
        raise CheckpointError(
            f"the VQ-GAN of run {vqgan_run} was trained with another preset or geometry "
            f"({'; '.join(diff[:4])}); use a VQ-GAN run of the same preset, or train one"
        )
    return rundir


def load_frozen_vqgan(
    vqgan_run: RunLike, cfg: LadConfig, device: str | torch.device
) -> tuple[VQGAN, dict[str, Any]]:
    """(VQGAN in eval mode without gradients, its meta) after :func:`check_vqgan_run`."""
    return load_vqgan(check_vqgan_run(vqgan_run, cfg), device=device)


@dataclass(frozen=True)
class SamplingModels:
    """A run's diffusion model and the frozen VQ-GAN it was trained on (:func:`load_sampling_models`).

    rundir, cfg: the run, opened once, and its config; net, meta: the denoiser and its checkpoint's meta
    (:func:`load_diffusion`); vq, vq_meta: the VQ-GAN and its checkpoint's meta; vqgan_run: the run that
    holds that VQ-GAN (``rundir.path`` itself, usually).
    """

    rundir: RunDir
    cfg: LadConfig
    net: LatentUNet
    meta: dict[str, Any]
    vq: VQGAN
    vq_meta: dict[str, Any]
    vqgan_run: Path

    @property
    def vqgan_hash(self) -> str:
        """The hash of the VQ-GAN checkpoint loaded (:func:`checkpoint_hash`)."""
        return self.vq_meta["checkpoint_hash"]


def load_sampling_models(run: RunLike, device: str | torch.device) -> SamplingModels:
    """The diffusion model of ``run`` and the VQ-GAN it was trained on, checked against the run's preset
    and geometry (:func:`check_vqgan_run`). One pass: the run is opened and its config parsed once (the
    VQ-GAN's run is opened again only when it is another folder), each checkpoint read and hashed once."""
    rundir = open_run(run)
    cfg = rundir.config()
    net, meta = load_diffusion(rundir, device)
    vqgan_run = vqgan_run_of(rundir.path, meta)
    same = vqgan_run.resolve() == rundir.path.resolve()
    vq, vq_meta = load_frozen_vqgan(rundir if same else vqgan_run, cfg, device)
    return SamplingModels(rundir, cfg, net, meta, vq, vq_meta, vqgan_run)


# ------------------------------------------------------------------------------------------ latents


def mask_as_image(mask: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Render a label map as a one-channel image for the VQ-GAN encoder (Lad's content condition,
    ``docs/lad.md``).

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


@torch.no_grad()
def encode_case(
    vq: Any, image: np.ndarray | None, mask: np.ndarray, cfg: LadConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """Latents and conditions of one case, computed one sample at a time (batch-size independent).

    image (D, H, W) in [-1, 1] or None, mask (D, H, W) canonical ids -> ``latent`` (C, d, h, w) in [-1, 1]
    (absent without an image), ``content`` (C, d, h, w) and ``structure`` (L,) float32, log1p-normalised,
    and, with spatial conditioning, ``spatial`` (K, d, h, w) float32, the mask's organ fractions on the
    latent grid (:func:`lad_fast.conditioning.conditions.spatial_for`).
    """
    from lad_fast.conditioning.conditions import normalize_structure, spatial_for, structure_condition

    m = torch.from_numpy(np.asarray(mask, dtype=np.int64))[None].to(device)
    out = {
        "content": vq.encode_pre_quant(mask_as_image(m))[0].float().cpu(),
        "structure": normalize_structure(structure_condition(np.asarray(mask), cfg.condition)),
    }
    if cfg.condition.spatial != "none":  # the content encoding's grid is the latent grid
        grid = tuple(out["content"].shape[1:])
        out["spatial"] = spatial_for(np.asarray(mask), grid, cfg.condition.spatial)
    if image is not None:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None].to(device)
        out["latent"] = vq.to_unit(vq.encode(x))[0].float().cpu()
    return out


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
    """Inverse of :func:`normalize_latents` (the identity when the checkpoint has no ``latent_norm``)."""
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
