"""The training loop shared by every trained model (VQ-GAN, latent diffusion, organ segmenter).

A model's training module builds its networks, optimisers and loss functions, then calls :func:`train`
with them. The loop owns everything else: resume, autocast and grad scaling, gradient clipping, the
NaN/Inf guard, EMA weights, DDP and ``torch.compile`` wrapping, the progress bar, ``log.jsonl``,
previews and checkpoints. Example (one optimiser)::

    phase = Phase("model", torch.optim.AdamW(net.parameters(), lr=cfg.lr),
                  loss=lambda mods, batch, step: (F.l1_loss(mods["model"](batch), batch), {}))
    train(run, "segmenter", cfg, {"model": net}, [phase], batches, model_config=config_to_dict(seg_cfg))

Determinism: ``batches(step, rank, world)`` must be a pure function of its arguments (use
:func:`lad_fast.distributed.shard_indices` / ``step_generator``); with RNG states restored from
``state.pt``, a resumed run reaches the same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lad_fast.checkpoints import (
    Checkpoint,
    capture_rng,
    config_hash,
    latest_step_dir,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    seed_all,
    versions,
)
from lad_fast.config import TrainConfig
from lad_fast.distributed import DistInfo, all_true, init_distributed, step_seed
from lad_fast.errors import CheckpointError, ConfigError, OutputExistsError, TrainingDivergedError
from lad_fast.runs import RunDir, config_diff
from lad_fast.train.ema import EMA

# loss(modules, batch, step) -> (scalar loss, {name: value} to log). ``modules`` are the wrapped
# (DDP / compiled) modules: call them, not the originals, so gradients synchronise across ranks.
LossFn = Callable[[Mapping[str, nn.Module], Any, int], "tuple[torch.Tensor, Mapping[str, Any]]"]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Phase:
    """One optimiser and the loss it minimises; phases run in order every step from ``start_step`` on.

    The VQ-GAN uses two: ``Phase("generator", opt_g, g_loss)`` and
    ``Phase("discriminator", opt_d, d_loss, start_step=cfg.gan_start_step)``.
    ``scheduler`` (optional) steps once per loop step while the phase is active, skipped steps
    included, so the learning rate stays a function of the step.
    """

    name: str
    optimizer: torch.optim.Optimizer
    loss: LossFn
    start_step: int = 0
    scheduler: Any | None = None


@dataclass
class TrainResult:
    step: int  # completed steps
    bad_steps: int  # steps skipped by the NaN/Inf guard, in total
    losses: dict[str, float] = field(default_factory=dict)  # means over the last log window
    checkpoint: Path | None = None  # the newest checkpoint folder (rank 0), None if none was written


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _as_float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def _wrap(modules: Mapping[str, nn.Module], cfg: TrainConfig, device: torch.device, info: DistInfo):
    """DDP for modules with trainable parameters (under torchrun), then torch.compile on CUDA."""
    wrapped: dict[str, nn.Module] = {}
    for name, m in modules.items():
        w: nn.Module = m
        if info.enabled and any(p.requires_grad for p in m.parameters()):
            from torch.nn.parallel import DistributedDataParallel

            w = DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile and device.type == "cuda":
            w = torch.compile(w)  # type: ignore[assignment]
        wrapped[name] = w
    return wrapped


class _Guard:
    """Counts non-finite steps and stops training after ``max_bad`` of them."""

    def __init__(self, model: str, max_bad: int, bad: int = 0) -> None:
        self.model, self.max_bad, self.bad = model, max_bad, bad

    def record(self, step: int, phase: str, what: str) -> None:
        self.bad += 1
        if self.bad > self.max_bad:
            raise TrainingDivergedError(
                f"{self.model} training diverged: {self.bad} steps had a non-finite {what} (the last at "
                f"step {step}, phase {phase!r}; limit {self.model}_train.max_bad_steps={self.max_bad}); "
                "lower the learning rate, use amp 'bf16' or 'none', or resume from an earlier checkpoint"
            )


def _run_phase(
    ph: Phase,
    wrapped: Mapping[str, nn.Module],
    batch: Any,
    step: int,
    cfg: TrainConfig,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    info: DistInfo,
) -> tuple[str, dict[str, float]]:
    """One optimiser step. Returns ("ok" | "loss" | "gradient" | "overflow", logged values)."""
    opt = ph.optimizer
    opt.zero_grad(set_to_none=True)
    with _autocast(device, cfg.amp):
        loss, extra = ph.loss(wrapped, batch, step)
    loss_value = _as_float(loss)
    # Every rank must take the same branch, or DDP's gradient all-reduce would hang.
    if not all_true(math.isfinite(loss_value), info, device):
        return "loss", {}
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    grad_ok = all_true(bool(torch.isfinite(norm)), info, device)
    if scaler.is_enabled():
        # fp16: the scaler skips an overflowing step and lowers its scale; that is routine, not
        # divergence, as long as the loss itself stays finite.
        scaler.step(opt)
        scaler.update()
        if not grad_ok:
            return "overflow", {}
    elif not grad_ok:
        opt.zero_grad(set_to_none=True)
        return "gradient", {}
    else:
        opt.step()
    logs = {ph.name: loss_value, f"{ph.name}_grad_norm": float(norm)}
    logs.update({k: _as_float(v) for k, v in extra.items()})
    return "ok", logs


def _build_meta(
    model: str,
    run: RunDir,
    model_config: Mapping[str, Any],
    meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
) -> dict[str, Any]:
    extra = dict(meta() if callable(meta) else (meta or {}))
    preset = extra.pop("preset", None)
    if preset is None and run.config_path.is_file():
        preset = run.config_dict().get("preset")
    return {
        "model": model,
        **versions(),
        "preset": preset,
        "data_hash": extra.pop("data_hash", None),
        "model_config": dict(model_config),
        "model_config_hash": config_hash(model_config),
        "extra": extra,
    }


def _check_resume(ckpt: Checkpoint, model: str, model_config: Mapping[str, Any]) -> None:
    stored = ckpt.meta.get("model_config", {})
    if ckpt.meta.get("model_config_hash") != config_hash(model_config):
        diff = config_diff(stored, dict(model_config)) or ["(hash differs)"]
        raise CheckpointError(
            f"cannot resume {model} from {ckpt.path}: the model config changed ({'; '.join(diff)}); "
            "resume with the original config, or start a new --run"
        )


def train(
    run: RunDir,
    model: str,
    cfg: TrainConfig,
    modules: Mapping[str, nn.Module],
    phases: Sequence[Phase],
    batches: Callable[[int, int, int], Any],
    *,
    model_config: Mapping[str, Any],
    meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    resume: bool = False,
    force: bool = False,
    fallback: bool = False,
    preview: Callable[[int, Path], None] | None = None,
    device: torch.device | str = "cpu",
    stop_at: int | None = None,
    keep: int = 2,
) -> TrainResult:
    """Train ``modules`` for ``cfg.steps`` steps, checkpointing into ``run/<model>/``.

    modules: the trained networks by name, saved as ``<name>.safetensors``; ``"model"`` is the one
        whose EMA is kept when ``cfg.ema_decay > 0``. Frozen helpers (a VQ-GAN under the diffusion
        model) belong in the loss closures, not here. Modules must already be on ``device``.
    phases: optimiser steps run in order each step (see :class:`Phase`).
    batches: ``batches(step, rank, world) -> batch``, a pure function of its arguments; an object with
        ``state_dict``/``load_state_dict`` also has its state saved in ``state.pt``.
    model_config: JSON-ready dict (``config_to_dict(cfg.vqgan)``...) stored in ``meta.json``; resuming
        with a different one raises CheckpointError naming the fields.
    meta: extra ``meta.json`` entries (``preset``, ``data_hash``, ``latent_scale`` ...), or a callable
        evaluated at each checkpoint.
    resume: continue from the latest complete checkpoint (starts fresh when there is none); without it
        an existing checkpoint raises OutputExistsError unless ``force`` (which deletes it).
    fallback: on resume, skip a corrupt latest checkpoint for the previous complete one (warns).
    preview: ``preview(step, run.path)`` on rank 0 every ``cfg.preview_every`` steps; it cannot disturb
        the training RNG streams (they are saved and restored around it).
    stop_at: stop after this many completed steps with a checkpoint, as if interrupted (a time budget).
    """
    if cfg.amp not in AMP_DTYPES:
        raise ConfigError(f"{model}_train.amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.amp!r}")
    if cfg.ema_decay > 0 and "model" not in modules:
        raise ConfigError(f"ema_decay > 0 needs a module named 'model' (got {', '.join(modules)})")
    if not phases:
        raise ConfigError("train() needs at least one Phase")
    device = torch.device(device)
    info = init_distributed(device)
    model_dir = run.model_dir(model)

    ckpt: Checkpoint | None = None
    if resume:
        ckpt = load_checkpoint(model_dir, model, fallback=fallback)
        if ckpt is not None:
            _check_resume(ckpt, model, model_config)
    elif latest_step_dir(model_dir) is not None:
        if not force:
            raise OutputExistsError(
                f"{model_dir} already holds a {model} checkpoint; pass --resume to continue it or --force "
                "to start over (deleting it)"
            )
        if info.is_main:
            run.clear_model(model)
    if info.enabled:
        torch.distributed.barrier()

    scalers = {ph.name: torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16") for ph in phases}
    ema = EMA(modules["model"], cfg.ema_decay) if cfg.ema_decay > 0 else None
    step, guard = 0, _Guard(model, cfg.max_bad_steps)
    if ckpt is None:
        # Dropout and other in-step noise: a function of (seed, rank), whatever the caller drew before.
        seed_all(step_seed(cfg.seed, -1, info.rank))
    else:
        for name, m in modules.items():
            ckpt.load_module(name, m)
        st = ckpt.state
        try:
            for ph in phases:
                ph.optimizer.load_state_dict(st["optimizers"][ph.name])
                if ph.scheduler is not None:
                    ph.scheduler.load_state_dict(st["schedulers"][ph.name])
                scalers[ph.name].load_state_dict(st["scalers"][ph.name])
        except (KeyError, ValueError) as err:
            raise CheckpointError(
                f"{ckpt.path / 'state.pt'} does not match this training setup (phases "
                f"{[ph.name for ph in phases]}, saved {sorted(st.get('optimizers', {}))}: {err}); "
                "resume with the code and options that wrote it, or start a new --run"
            ) from err
        if ema is not None:
            ema.load_state_dict(ckpt.tensors("ema") if ckpt.has("ema") else modules["model"].state_dict())
        if st.get("data") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(st["data"])
        step, guard.bad = int(st["step"]), int(st["bad_steps"])
        ranks = st.get("rng_ranks") or []
        if len(ranks) == info.world:
            restore_rng(ranks[info.rank])
        else:  # another world size: rank 0 continues its stream, the others start fresh ones
            restore_rng(st["rng"])
            if info.rank > 0:
                seed_all(step_seed(cfg.seed, step, info.rank))
        if info.is_main:
            run.truncate_log(model, after_step=step)  # the lost steps are trained again and re-logged
            run.log({"model": model, "event": "resume", "step": step, "checkpoint": ckpt.path.name})

    wrapped = _wrap(modules, cfg, device, info)
    for m in modules.values():
        m.train()

    def save(at: int) -> Path | None:
        # Every rank's RNG state goes into state.pt, so a resumed DDP run continues each rank's stream.
        rngs: list[Any] = [capture_rng()]
        if info.enabled:
            rngs = [None] * info.world
            torch.distributed.all_gather_object(rngs, capture_rng())
        if not info.is_main:
            return None
        state = {
            "step": at,
            "bad_steps": guard.bad,
            "world": info.world,
            "rng": rngs[0],
            "rng_ranks": rngs,
            "optimizers": {ph.name: ph.optimizer.state_dict() for ph in phases},
            "schedulers": {ph.name: ph.scheduler.state_dict() for ph in phases if ph.scheduler is not None},
            "scalers": {name: s.state_dict() for name, s in scalers.items()},
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
        }
        path = save_checkpoint(
            model_dir,
            at,
            modules=modules,
            tensors={"ema": ema.state_dict()} if ema is not None else None,
            state=state,
            meta=_build_meta(model, run, model_config, meta),
            keep=keep,
        )
        run.log({"model": model, "event": "checkpoint", "step": at, "checkpoint": path.name})
        return path

    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    saved_at, last_path = step, (ckpt.path if ckpt is not None else None)
    window: dict[str, list[float]] = {}
    last_means: dict[str, float] = {}
    t_start = t_window = time.perf_counter()
    window_steps = 0
    vols_per_step = cfg.batch_size * info.world

    from lad_fast.progress import make_progress

    bar = make_progress() if info.is_main else contextlib.nullcontext()
    with bar as progress:
        task = (
            progress.add_task(model, total=cfg.steps, completed=step, status="")
            if progress is not None
            else None
        )
        while step < end:
            batch = batches(step, info.rank, info.world)
            stepped = False
            for ph in phases:
                if step < ph.start_step:
                    continue
                outcome, logs = _run_phase(ph, wrapped, batch, step, cfg, scalers[ph.name], device, info)
                if ph.scheduler is not None:
                    ph.scheduler.step()
                if outcome in ("loss", "gradient"):
                    if info.is_main:
                        run.log(
                            {
                                "model": model,
                                "event": "bad_step",
                                "step": step + 1,
                                "phase": ph.name,
                                "non_finite": outcome,
                                "bad_steps": guard.bad + 1,
                            }
                        )
                    guard.record(step + 1, ph.name, outcome)
                elif outcome == "overflow" and info.is_main:
                    run.log({"model": model, "event": "fp16_overflow", "step": step + 1, "phase": ph.name})
                stepped |= outcome == "ok"
                for k, v in logs.items():
                    window.setdefault(k, []).append(v)
            if stepped and ema is not None:
                ema.update(modules["model"])
            step += 1
            window_steps += 1

            if step % max(cfg.log_every, 1) == 0 or step == end:
                now = time.perf_counter()
                last_means = {k: sum(v) / len(v) for k, v in window.items() if v}
                vol_s = window_steps * vols_per_step / max(now - t_window, 1e-9)
                if info.is_main:
                    run.log(
                        {
                            "model": model,
                            "step": step,
                            "losses": last_means,
                            "lr": {ph.name: ph.optimizer.param_groups[0]["lr"] for ph in phases},
                            "vol_s": round(vol_s, 3),
                            "elapsed_s": round(now - t_start, 3),
                            "time": time.time(),
                            "bad_steps": guard.bad,
                        }
                    )
                if progress is not None:
                    status = " ".join(f"{k} {v:.4g}" for k, v in last_means.items() if "grad_norm" not in k)
                    progress.update(task, status=f"{status} {vol_s:.2f} vol/s")
                window, t_window, window_steps = {}, now, 0
            if info.is_main:
                if progress is not None:
                    progress.update(task, completed=step)
                if preview is not None and cfg.preview_every > 0 and step % cfg.preview_every == 0:
                    rng = capture_rng()  # previews draw noise; training streams must not notice
                    preview(step, run.path)
                    restore_rng(rng)
            if step % max(cfg.checkpoint_every, 1) == 0 or step == end:
                last_path = save(step) or last_path
                saved_at = step
    if saved_at != step:  # defensive: the loop above always saves at ``end``
        last_path = save(step) or last_path
    return TrainResult(step=step, bad_steps=guard.bad, losses=last_means, checkpoint=last_path)
