"""Phase 1 training: the 3D VQ-GAN with Lad's locality loss, on the shared loop (``lad-fast train vqgan``).

What this module adds to :func:`lad_fast.train.loop.train`: the data (train split of a prepared dataset,
phantoms by default), the two phases (generator: L1 + commitment + locality [+ GAN, feature matching,
perceptual]; discriminator: hinge, from ``gan_start_step`` on), the ``meta.json`` entries later phases
read (``preset``, ``data_hash``, ``latent_scale``: the codebook's min and max), previews of held-out
input against reconstruction, and the held-out evaluation (whole-volume L1 and L1 inside each locality
organ's bounding box, in [-1, 1] units) logged at every checkpoint and at the end.

Run folder: ``run/config.json``, ``run/log.jsonl``, ``run/vqgan/step-*/`` (``model.safetensors`` and,
when their weights are > 0, ``disc2d.safetensors`` / ``disc3d.safetensors``), ``run/vqgan/previews/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lad_fast.checkpoints import latest_step_dir, load_checkpoint
from lad_fast.config import LadConfig, config_to_dict
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import CheckpointError, ConfigError, OutputExistsError
from lad_fast.losses import VQGANLoss, locality_loss, organ_groups
from lad_fast.models.vqgan import VQGAN
from lad_fast.runs import RunDir
from lad_fast.train.data import PreparedBatches, split_indices
from lad_fast.train.loop import Phase, TrainResult, train
from lad_fast.train.schedule import make_scheduler

MODEL = "vqgan"
PREVIEWS = "previews"
PREVIEW_CASES = 3  # held-out cases shown in a preview


@dataclass
class VQBatches:
    """``batches(step, rank, world) -> dict`` for the VQ-GAN: :class:`PreparedBatches` plus masks for
    mixed batches.

    ``image`` (B, 1, D, H, W) float32 in [-1, 1]; ``mask`` (B, D, H, W) int64 canonical labels, where a
    case without a mask is all background (so it has no locality box and adds no locality term), or None
    when no case of the batch has one; ``ids``.
    """

    base: PreparedBatches

    def _fill_masks(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["mask"] is not None:
            return batch
        ds = self.base.dataset
        masks = [ds[ds.case_ids.index(i)]["mask"] for i in batch["ids"]]
        if all(m is None for m in masks):
            return batch
        shape = batch["image"].shape[2:]
        batch["mask"] = torch.from_numpy(
            np.stack([np.zeros(shape, np.int64) if m is None else np.asarray(m, np.int64) for m in masks])
        )
        return batch

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        return self._fill_masks(self.base(step, rank, world))

    def chunks(self, size: int) -> Iterable[dict[str, Any]]:
        """Every case of the subset in order, ``size`` at a time (evaluation)."""
        n = len(self.base.indices)  # type: ignore[arg-type]
        for start in range(0, n, size):
            yield self._fill_masks(self.base.cases(range(start, min(n, start + size))))


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device, non_blocking=True)
    if device.type == "cpu" and t.ndim == 5:
        # oneDNN's 3D convolution backward is several times faster channels-last at these small channel
        # counts (measured on the tiny preset); the model is converted alike in train_vqgan.
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t


# ------------------------------------------------------------------------------------------ evaluation


def _batches_of(source: Any, batch_size: int) -> Iterable[dict[str, Any]]:
    if isinstance(source, Mapping):
        return [source]
    if isinstance(source, PreparedDataset):
        source = VQBatches(PreparedBatches(source, batch_size, seed=0))
    if isinstance(source, PreparedBatches):
        source = VQBatches(source)
    if isinstance(source, VQBatches):
        return source.chunks(batch_size)
    return source


@torch.no_grad()
def evaluate_reconstruction(
    vqgan: VQGAN,
    batches_or_dataset: Any,
    organs: Sequence[str] = ("pancreas+pancreatic_lesion",),
    batch_size: int = 2,
) -> dict[str, Any]:
    """Held-out reconstruction error of ``vqgan`` in [-1, 1] units (the model is left in its mode).

    batches_or_dataset: a PreparedDataset (every case), a PreparedBatches / VQBatches (its subset), one
        batch dict or an iterable of them (``image`` (B, 1, D, H, W), ``mask`` (B, D, H, W) or None).
    organs: canonical organ names; ``"a+b"`` is one box over both (Lad's pancreas + lesion box).

    Returns ``{"l1": whole-volume mean |x - recon| over every case, "box_l1": {organ: mean over the
    cases that have the organ of the mean |x - recon| inside its 3D bounding box, or None when no case
    has it}, "box_cases": {organ: cases that have it}, "cases": n}``.
    """
    groups = organ_groups(organs)
    was_training = vqgan.training
    vqgan.eval()
    device = next(vqgan.parameters()).device
    total, n = 0.0, 0
    box_sum = [0.0] * len(groups)
    box_n = [0] * len(groups)
    try:
        for batch in _batches_of(batches_or_dataset, batch_size):
            x = batch["image"].to(device).float()
            recon = vqgan.decode(vqgan.encode(x)).float()
            err = (x - recon).abs().flatten(1).mean(1)  # (B,)
            total += float(err.sum())
            n += x.shape[0]
            mask = batch.get("mask")
            if mask is None:
                continue
            mask = mask.to(device)
            for b in range(x.shape[0]):
                for g, ids in enumerate(groups):
                    if not torch.isin(mask[b], torch.as_tensor(ids, device=device)).any():
                        continue
                    # One sample, one organ: locality_loss is then exactly the L1 inside its box.
                    box_sum[g] += float(locality_loss(x[b : b + 1], recon[b : b + 1], mask[b : b + 1], [ids]))
                    box_n[g] += 1
    finally:
        vqgan.train(was_training)
    return {
        "l1": total / max(n, 1),
        "box_l1": {o: (box_sum[g] / box_n[g] if box_n[g] else None) for g, o in enumerate(organs)},
        "box_cases": {o: box_n[g] for g, o in enumerate(organs)},
        "cases": n,
    }


# ------------------------------------------------------------------------------------------ previews


def _unit_window(cfg: LadConfig, hu: tuple[float, float] = (-160.0, 240.0)) -> tuple[float, float]:
    """A soft-tissue HU window expressed in the [-1, 1] units of prepared images."""
    lo, hi = cfg.geometry.hu_window
    return tuple(float((v - lo) / (hi - lo) * 2.0 - 1.0) for v in hu)  # type: ignore[return-value]


@torch.no_grad()
def render_reconstruction(
    vqgan: VQGAN, batch: Mapping[str, Any], cfg: LadConfig, title_step: int | None = None
):
    """PIL image: rows input, reconstruction and |error| x5 of the axial slice with the most pancreas
    (the middle slice without a mask) of each case of ``batch`` (``image`` (B, 1, D, H, W))."""
    from lad_fast.data.labels import CANONICAL_ID
    from lad_fast.preview import render_grid

    was_training = vqgan.training
    vqgan.eval()
    try:
        device = next(vqgan.parameters()).device
        x = batch["image"].to(device).float()
        recon = vqgan.decode(vqgan.encode(x)).float().clamp(-1, 1)
    finally:
        vqgan.train(was_training)
    x_np, r_np = x[:, 0].cpu().numpy(), recon[:, 0].cpu().numpy()
    mask = batch.get("mask")
    rows: list[list[np.ndarray]] = [[], [], []]
    lo, hi = _unit_window(cfg)
    for b in range(x_np.shape[0]):
        z = x_np.shape[1] // 2
        if mask is not None:
            per_slice = (mask[b] == CANONICAL_ID["pancreas"]).flatten(1).sum(1)
            if int(per_slice.max()) > 0:
                z = int(per_slice.argmax())
        rows[0].append(x_np[b, z])
        rows[1].append(r_np[b, z])
        # |error| x5 drawn in the same window: 0 error is the window's bottom (black).
        rows[2].append(lo + np.abs(x_np[b, z] - r_np[b, z]) * 5.0 * (hi - lo) / 2.0)
    label = "recon" if title_step is None else f"recon @{title_step}"
    spacing = (float(cfg.geometry.spacing[1]), float(cfg.geometry.spacing[2]))
    return render_grid(rows, ["input", label, "|err| x5"], window=(lo, hi), spacing=spacing)


def _write_png(image: Any, path: Path) -> None:
    import io

    from lad_fast.atomic import write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ training


def _precheck(model_dir: Path, digest: str, resume: bool, force: bool) -> None:
    """Refuse what the loop would refuse, before RunDir.create records the new config: an existing
    checkpoint without --resume or --force, and on --resume a damaged checkpoint, one of another model,
    or one trained on other data."""
    latest = latest_step_dir(model_dir) if model_dir.is_dir() else None
    if latest is None:
        return
    if not resume:
        if not force:
            raise OutputExistsError(
                f"{model_dir} already holds a {MODEL} checkpoint; pass --resume to continue it or --force "
                "to start over (deleting it)"
            )
        return
    ckpt = load_checkpoint(model_dir, MODEL)  # verifies sizes and hashes
    stored = ckpt.meta.get("data_hash") if ckpt is not None else None
    if stored is not None and stored != digest:
        raise CheckpointError(
            f"cannot resume {ckpt.path}: it was trained on another dataset (data hash {stored[:12]}, this "
            f"data {digest[:12]}); resume with the original --data, or start a new --run"
        )


class _Discriminators:
    """Point the loss's discriminators at the modules the loop passes (DDP / compiled wrappers) for one
    call, so gradients synchronise across ranks; a no-op on one CPU process, where they are the same."""

    def __init__(self, loss: VQGANLoss, mods: Mapping[str, nn.Module]) -> None:
        self.loss = loss
        self.swap = {
            attr: mods[name]
            for attr, name in (("disc_2d", "disc2d"), ("disc_3d", "disc3d"))
            if name in mods and mods[name] is not getattr(loss, attr)
        }
        self.saved: dict[str, nn.Module] = {}

    def __enter__(self) -> None:
        for attr, m in self.swap.items():
            self.saved[attr] = self.loss._modules[attr]  # type: ignore[assignment]
            self.loss._modules[attr] = m

    def __exit__(self, *exc: Any) -> None:
        for attr, m in self.saved.items():
            self.loss._modules[attr] = m


def _perceptual_net(cfg: LadConfig, device: torch.device) -> nn.Module | None:
    """The frozen feature network of the perceptual term: a lad-fast segmenter run's encoder."""
    lc = cfg.vqgan_loss
    if lc.perceptual <= 0:
        return None
    if not lc.perceptual_weights:
        raise ConfigError(
            f"vqgan_loss.perceptual is {lc.perceptual} but vqgan_loss.perceptual_weights is not set; point "
            "it at a lad-fast run holding a trained segmenter (lad-fast train segmenter), or set perceptual 0"
        )
    from lad_fast.trained import load_segmenter

    seg, _ = load_segmenter(Path(lc.perceptual_weights), device)

    class _Features(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return self.net.encoder_features(x)

    return _Features(seg)


def train_vqgan(
    run: Path,
    cfg: LadConfig,
    data: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | torch.device = "auto",
    stop_at: int | None = None,
) -> TrainResult:
    """Train the VQ-GAN of ``cfg`` into ``run/vqgan/`` on the train split of ``data``.

    data: a prepared dataset at ``cfg.preset`` (default: the cached phantoms of that preset).
    steps: overrides ``cfg.vqgan_train.steps`` (recorded in the run's config.json).
    resume / force / stop_at: as :func:`lad_fast.train.loop.train`.
    Volumes are (B, 1, D, H, W) = (B, 1, *cfg.geometry.shape) in [-1, 1]; latents
    (B, code_dim, D/f, H/f, W/f) with f = 2 ** (len(cfg.vqgan.channels) - 1).
    Raises InputError for a dataset of another preset, CheckpointError for a run of another config or a
    damaged checkpoint on resume, OutputExistsError for a run folder that is not a lad-fast run, all
    before anything is written.
    """
    from lad_fast.devices import resolve_device

    dev = resolve_device(device)
    if steps is not None:
        cfg = replace(cfg, vqgan_train=replace(cfg.vqgan_train, steps=steps))
    if data is None:
        from lad_fast.data.cache import phantom_dataset

        data = phantom_dataset(cfg.preset)
    dataset = PreparedDataset(data, expect_preset=cfg.preset)
    if tuple(dataset.geometry.shape) != tuple(cfg.geometry.shape):
        raise ConfigError(
            f"{dataset.path}: prepared at shape {tuple(dataset.geometry.shape)}, but this config needs "
            f"{tuple(cfg.geometry.shape)}; re-prepare it with this config"
        )
    digest = dataset.content_hash(masks=False)  # the pipeline predicts masks after this phase
    tc, lc = cfg.vqgan_train, cfg.vqgan_loss
    train_idx, val_idx = split_indices(len(dataset))
    _precheck(Path(run) / MODEL, digest, resume, force)
    rundir = RunDir.create(run, cfg)

    torch.manual_seed(tc.seed)  # initial weights: a function of the seed alone
    model = VQGAN(cfg.vqgan).to(dev)
    loss_fn = VQGANLoss(lc, cfg.vqgan.in_channels, perceptual_net=_perceptual_net(cfg, dev)).to(dev)
    if loss_fn.perceptual is not None:  # the segmenter encoder is 3D: compare whole volumes
        from lad_fast.losses import SlicePerceptualLoss

        loss_fn.perceptual = SlicePerceptualLoss(loss_fn.perceptual.net, spatial_dims=3).to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)
    modules: dict[str, nn.Module] = {"model": model}
    if lc.gan_2d > 0:
        modules["disc2d"] = loss_fn.disc_2d
    if lc.gan_3d > 0:
        modules["disc3d"] = loss_fn.disc_3d
    locality = bool(lc.locality_organs) and any(w != 0 for w in lc.locality_weights)

    batches = VQBatches(PreparedBatches(dataset, tc.batch_size, tc.seed, indices=train_idx))
    held_out = VQBatches(PreparedBatches(dataset, tc.batch_size, tc.seed, indices=val_idx))
    cache: dict[str, torch.Tensor] = {}

    def generator_loss(mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int):
        x = _on(batch["image"], dev)
        mask = batch["mask"].to(dev) if locality and batch["mask"] is not None else None
        out = mods["model"](x)
        with _Discriminators(loss_fn, mods):
            terms = loss_fn.generator_loss(x, out.recon, out.vq_loss, mask, step)
        if len(modules) > 1 and step >= lc.gan_start_step:
            cache["x"], cache["recon"] = x, out.recon.detach()
        logs = {k: v.detach() for k, v in terms.items() if k != "total" and (k in ("l1", "vq") or v.ne(0))}
        logs.update(perplexity=out.perplexity.detach(), restarted=out.restarted.detach())
        return terms["total"], logs

    def discriminator_loss(mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int):
        x, recon = cache.pop("x"), cache.pop("recon")
        with _Discriminators(loss_fn, mods):
            terms = loss_fn.discriminator_loss(x, recon, step)
        return terms["total"], {k: v.detach() for k, v in terms.items() if k != "total"}

    def adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)

    opt_g = adam(model.parameters())
    phases = [Phase("generator", opt_g, generator_loss, scheduler=make_scheduler(opt_g, tc))]
    disc_params = [p for name in ("disc2d", "disc3d") if name in modules for p in modules[name].parameters()]
    if disc_params:
        phases.append(Phase("discriminator", adam(disc_params), discriminator_loss, lc.gan_start_step))

    organs = lc.locality_organs or ("pancreas+pancreatic_lesion",)
    state: dict[str, Any] = {"step": 0, "eval": None}

    def evaluate(step: int) -> dict[str, Any]:
        if state["eval"] is None or state["eval"]["step"] != step:
            result = evaluate_reconstruction(model, held_out, organs, batch_size=tc.batch_size)
            state["eval"] = {"step": step, **result}
            rundir.log({"model": MODEL, "event": "eval", "step": step, "heldout": result})
        return state["eval"]

    def meta() -> dict[str, Any]:
        return {
            "preset": cfg.preset,
            "data_hash": digest,
            "data": str(Path(data).resolve()),
            "latent_scale": list(model.latent_scale()),
            "latent_shape": [cfg.vqgan.code_dim, *(s // model.downsample_factor for s in cfg.geometry.shape)],
            "train_cases": len(train_idx),
            "heldout_cases": len(val_idx),
            "heldout": evaluate(state["step"]),
        }

    def preview(step: int, run_path: Path) -> None:
        batch = next(iter(held_out.chunks(PREVIEW_CASES)))
        image = render_reconstruction(model, batch, cfg, title_step=step)
        _write_png(image, rundir.model_dir(MODEL) / PREVIEWS / f"step-{step:08d}.png")

    def tracked(step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        state["step"] = step + 1  # the step count once this batch is trained (read by meta at save)
        return batches(step, rank, world)

    result = train(
        rundir,
        MODEL,
        tc,
        modules,
        phases,
        tracked,
        model_config=config_to_dict(cfg.vqgan),
        meta=meta,
        resume=resume,
        force=force,
        preview=preview,
        device=dev,
        stop_at=stop_at,
    )
    state["step"] = result.step
    if state["eval"] is None or state["eval"]["step"] != result.step:
        evaluate(result.step)  # e.g. resuming a run that was already complete
    return result
