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

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lad_fast.config import LadConfig, config_to_dict
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import ConfigError
from lad_fast.models.vqgan import VQGAN
from lad_fast.runs.checkpoints import latest_step_dir
from lad_fast.train.data import PreparedBatches, split_indices, training_dataset
from lad_fast.train.loop import Job, Phase, Setup, TrainResult, train
from lad_fast.train.losses import (
    SlicePerceptualLoss,
    VQGANLoss,
    locality_loss,
    make_discriminators,
    organ_groups,
)
from lad_fast.train.schedule import make_scheduler
from lad_fast.utils.progress import say

MODEL = "vqgan"
PREVIEWS = "previews"
PREVIEW_CASES = 3  # held-out cases shown in a preview
DEFAULT_HOLDOUT = 0.2  # fraction of cases held out for the reconstruction report (--holdout)


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
        # oneDNN's 3D convolution backward is faster channels-last at these small channel counts; the
        # model is converted alike (_networks).
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
    from lad_fast.preview.render import render_grid

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

    from lad_fast.utils.atomic import write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ training


class _Features(nn.Module):
    """A segmenter seen as a feature network: its encoder's feature maps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.encoder_features(x)


def _perceptual_loss(cfg: LadConfig, device: torch.device) -> SlicePerceptualLoss | None:
    """The perceptual term's frozen network: a lad-fast segmenter run's encoder, on whole volumes (it is
    a 3D network). None when the term's weight is 0."""
    lc = cfg.vqgan_loss
    if lc.perceptual <= 0:
        return None
    if not lc.perceptual_weights:
        raise ConfigError(
            f"vqgan_loss.perceptual is {lc.perceptual} but vqgan_loss.perceptual_weights is not set; point "
            "it at a lad-fast run holding a trained segmenter (lad-fast train segmenter), or set perceptual 0"
        )
    from lad_fast.runs.loading import load_segmenter

    seg, _ = load_segmenter(Path(lc.perceptual_weights), device)
    return SlicePerceptualLoss(_Features(seg), spatial_dims=3).to(device)


class _GANSteps:
    """The VQ-GAN's two phase losses. Within one step the generator phase runs first and hands its input
    and detached reconstruction to the discriminator phase (``_fake``), which trains on them; both call
    the discriminators the loop passes in ``mods`` (DDP / compiled wrappers, so gradients synchronise),
    and the bare ones for a discriminator whose weight is 0 (it is evaluated, as Lad's loss does, but
    not trained)."""

    def __init__(
        self,
        loss: VQGANLoss,
        discs: tuple[nn.Module, nn.Module],
        perceptual: SlicePerceptualLoss | None,
        device: torch.device,
        locality: bool,
        handoff: bool,
    ) -> None:
        self.loss, self.discs, self.perceptual, self.device = loss, discs, perceptual, device
        self.locality, self.handoff = locality, handoff
        self._fake: tuple[torch.Tensor, torch.Tensor] | None = None

    def _disc_args(self, mods: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        return {"disc_2d": mods.get("disc2d", self.discs[0]), "disc_3d": mods.get("disc3d", self.discs[1])}

    def generator(self, mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int):
        x = _on(batch["image"], self.device)
        mask = batch["mask"].to(self.device) if self.locality and batch["mask"] is not None else None
        out = mods["model"](x)
        terms = self.loss.generator_loss(
            x, out.recon, out.vq_loss, mask, step, perceptual=self.perceptual, **self._disc_args(mods)
        )
        if self.handoff and self.loss.gan_active(step):
            self._fake = (x, out.recon.detach())
        logs = {k: v.detach() for k, v in terms.items() if k != "total" and (k in ("l1", "vq") or v.ne(0))}
        logs.update(perplexity=out.perplexity.detach(), restarted=out.restarted.detach())
        return terms["total"], logs

    def discriminator(self, mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int):
        if self._fake is None:
            raise RuntimeError("the discriminator phase ran before the generator phase of its step")
        (x, recon), self._fake = self._fake, None
        terms = self.loss.discriminator_loss(x, recon, step, **self._disc_args(mods))
        return terms["total"], {k: v.detach() for k, v in terms.items() if k != "total"}


def check_holdout(holdout: float | None) -> None:
    """ConfigError unless ``holdout`` is None or a fraction in [0, 1)."""
    if holdout is not None and not 0 <= holdout < 1:  # NaN fails too
        raise ConfigError(f"--holdout must be a fraction in [0, 1), got {holdout}")


def _holdout(run: Path, holdout: float | None, resume: bool) -> float:
    """The held-out fraction: the given one (0 <= f < 1), else the resumed checkpoint's, else the default;
    a resumed run refuses another split (its training batches would change)."""
    check_holdout(holdout)
    saved = None
    step_dir = latest_step_dir(run / MODEL) if resume and (run / MODEL).is_dir() else None
    if step_dir is not None and (step_dir / "meta.json").is_file():
        # older checkpoints lack it (they held out the default); a damaged one fails later, with its name
        with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
            meta = json.loads((step_dir / "meta.json").read_text(encoding="utf-8"))
            saved = meta["extra"]["holdout"]
    if holdout is None:
        return float(saved) if isinstance(saved, (int, float)) else DEFAULT_HOLDOUT
    if isinstance(saved, (int, float)) and float(saved) != holdout:
        raise ConfigError(
            f"{step_dir} was trained with --holdout {saved:g}; resume with the same fraction (or without "
            "--holdout), or start a new --run"
        )
    return float(holdout)


@dataclass(frozen=True)
class _Split:
    """The VQ-GAN's data: the dataset, its training and held-out case indices, the held-out fraction they
    come from, and the images' content hash (``data_hash``)."""

    dataset: PreparedDataset
    train_idx: list[int]
    val_idx: list[int]
    holdout: float
    digest: str


def _networks(
    setup: Setup, cfg: LadConfig
) -> tuple[VQGAN, SlicePerceptualLoss | None, tuple[nn.Module, ...]]:
    """(VQ-GAN, perceptual loss or None, (2D, 3D) discriminators) on ``setup.device``. Construction order
    fixes the initial weights: VQ-GAN, perceptual network (a segmenter is built, then loaded), 2D and 3D
    discriminators (both, whatever their weights)."""
    dev = setup.device
    with setup.initial_weights():
        model = VQGAN(cfg.vqgan).to(dev)
        perceptual = _perceptual_loss(cfg, dev)
        discs = tuple(d.to(dev) for d in make_discriminators(cfg.vqgan_loss, cfg.vqgan.in_channels))
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)  # as _on converts the batches
    return model, perceptual, discs


def _phases(modules: Mapping[str, nn.Module], gan: _GANSteps, cfg: LadConfig) -> list[Phase]:
    """The generator phase (Adam, the lr schedule), then the discriminator phase from ``gan_start_step``
    on when a discriminator is trained."""
    tc, lc = cfg.vqgan_train, cfg.vqgan_loss

    def adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)

    opt_g = adam(modules["model"].parameters())
    phases = [Phase("generator", opt_g, gan.generator, scheduler=make_scheduler(opt_g, tc))]
    disc_params = [p for name in ("disc2d", "disc3d") if name in modules for p in modules[name].parameters()]
    if disc_params:
        phases.append(Phase("discriminator", adam(disc_params), gan.discriminator, lc.gan_start_step))
    return phases


@dataclass
class _Report:
    """The VQ-GAN's held-out report: the reconstruction error logged at every checkpoint (and at the end
    of a call that trained nothing), the ``meta.json`` entries later phases read, and previews."""

    setup: Setup
    cfg: LadConfig
    model: VQGAN
    held_out: VQBatches
    split: _Split

    def evaluate(self, step: int) -> dict[str, Any]:
        organs = self.cfg.vqgan_loss.locality_organs or ("pancreas+pancreatic_lesion",)
        batch_size = self.cfg.vqgan_train.batch_size
        result = evaluate_reconstruction(self.model, self.held_out, organs, batch_size=batch_size)
        self.setup.run.log({"model": MODEL, "event": "eval", "step": step, "heldout": result})
        return {"step": step, **result}

    def meta(self, step: int) -> dict[str, Any]:  # at each checkpoint (rank 0)
        cfg, split, model = self.cfg, self.split, self.model
        return {
            "preset": cfg.preset,
            "data_hash": split.digest,
            "data": str(split.dataset.path.resolve()),
            "latent_scale": list(model.latent_scale()),
            "latent_shape": [cfg.vqgan.code_dim, *(s // model.downsample_factor for s in cfg.geometry.shape)],
            "train_cases": len(split.train_idx),
            "heldout_cases": len(split.val_idx),
            "holdout": split.holdout,
            "heldout": self.evaluate(step),
        }

    def finish(self, result: TrainResult) -> None:
        if result.step == result.started_at:  # nothing trained (a finished run resumed): still report
            self.evaluate(result.step)

    def preview(self, step: int, run_path: Path) -> None:
        batch = next(iter(self.held_out.chunks(PREVIEW_CASES)))
        image = render_reconstruction(self.model, batch, self.cfg, title_step=step)
        _write_png(image, self.setup.run.model_dir(MODEL) / PREVIEWS / f"step-{step:08d}.png")


def _vqgan_job(setup: Setup, cfg: LadConfig, split: _Split) -> Job:
    """What the loop trains: the VQ-GAN and the discriminators whose weight is > 0, the two phases, the
    training batches, and the held-out report."""
    lc, tc = cfg.vqgan_loss, cfg.vqgan_train
    model, perceptual, discs = _networks(setup, cfg)
    modules: dict[str, nn.Module] = {"model": model}
    if lc.gan_2d > 0:
        modules["disc2d"] = discs[0]
    if lc.gan_3d > 0:
        modules["disc3d"] = discs[1]
    locality = bool(lc.locality_organs) and any(w != 0 for w in lc.locality_weights)
    gan = _GANSteps(VQGANLoss(lc), discs, perceptual, setup.device, locality, handoff=len(modules) > 1)

    def batches(indices: list[int]) -> VQBatches:
        return VQBatches(PreparedBatches(split.dataset, tc.batch_size, tc.seed, indices=indices))

    report = _Report(setup, cfg, model, batches(split.val_idx), split)
    return Job(
        modules,
        _phases(modules, gan, cfg),
        batches(split.train_idx),
        model_config=config_to_dict(cfg.vqgan),
        meta=report.meta,
        preview=report.preview,
        finish=report.finish,
    )


def train_vqgan(
    run: Path,
    cfg: LadConfig,
    data: PreparedDataset | Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | torch.device = "auto",
    stop_at: int | None = None,
    holdout: float | None = None,
    batch: int | None = None,
) -> TrainResult:
    """Train the VQ-GAN of ``cfg`` into ``run/vqgan/`` on the train split of ``data``.

    data: a prepared dataset at ``cfg.preset``, open or a folder (default: the cached phantoms of that
        preset; :func:`lad_fast.train.data.training_dataset`).
    steps, batch: override ``cfg.vqgan_train.steps`` and ``batch_size`` (recorded in the run's config.json).
    resume / force / device / stop_at: as :func:`lad_fast.train.loop.train`.
    holdout: fraction of the cases (the last ones by id, at least one) held out for the reconstruction
        report; 0 evaluates on the training cases. Default: the resumed checkpoint's, else 0.2.
    Volumes are (B, 1, D, H, W) = (B, 1, *cfg.geometry.shape) in [-1, 1]; latents
    (B, code_dim, D/f, H/f, W/f) with f = 2 ** (len(cfg.vqgan.channels) - 1).
    Raises InputError for a dataset of another preset, CheckpointError for a run of another config or a
    damaged checkpoint or other data on resume, OutputExistsError for a run folder that is not a
    lad-fast run, all before anything is written.
    """
    cfg = replace(cfg, vqgan_train=cfg.vqgan_train.overridden(steps, batch))
    dataset = training_dataset(data, cfg)
    if tuple(dataset.geometry.shape) != tuple(cfg.geometry.shape):
        raise ConfigError(
            f"{dataset.path}: prepared at shape {tuple(dataset.geometry.shape)}, but this config needs "
            f"{tuple(cfg.geometry.shape)}; re-prepare it with this config"
        )
    digest = dataset.content_hash(masks=False)  # the pipeline predicts masks after this phase
    holdout = _holdout(Path(run), holdout, resume)
    train_idx, val_idx = split_indices(len(dataset), holdout, min_val=1 if holdout > 0 else 0)
    if not val_idx:
        val_idx = train_idx
    held = "evaluated on the training cases" if val_idx == train_idx else f"{len(val_idx)} held out"
    say(f"vqgan: {len(dataset)} cases, {held} (--holdout {holdout:g}), {len(train_idx)} trained on")
    split = _Split(dataset, train_idx, val_idx, holdout, digest)
    return train(
        run,
        cfg,
        MODEL,
        cfg.vqgan_train,
        partial(_vqgan_job, cfg=cfg, split=split),
        resume=resume,
        force=force,
        device=device,
        stop_at=stop_at,
        data_hash=digest,
    )
