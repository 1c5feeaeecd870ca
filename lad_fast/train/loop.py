"""The training loop shared by every trained model (VQ-GAN, latent diffusion, organ segmenter).

The loop owns setup and everything around the optimiser steps; a model's training module only says what
to train. :func:`train` does, in order (steps 1 to 3 in :func:`lad_fast.train.setup.open_run`):

1. choose this process's device (``lad_fast.utils.devices.choose_device``: ``cuda:LOCAL_RANK`` under torchrun)
   and join the process group (gloo on CPU, nccl on CUDA);
2. refuse a run that already holds a checkpoint of this model unless ``resume`` or ``force``, and verify
   the checkpoint to resume, all before anything is written;
3. create or reopen the run folder, delete the old checkpoints on ``force`` (rank 0; the other ranks wait);
4. call the trainer's ``build(setup)``, which builds its modules, phases, batches and metadata on
   ``setup.device`` and returns them as a :class:`Job`; modules built inside ``setup.initial_weights()``
   get initial weights that are a function of the training seed alone;
5. resume (weights, optimisers, RNG streams) or seed the in-step noise from (seed, rank), wrap modules
   in DDP (``device_ids`` for CUDA only) and ``torch.compile``, then run the steps: autocast and grad
   scaling, gradient clipping, the NaN/Inf guard, EMA weights, the progress bar, ``log.jsonl``,
   previews, checkpoints and a final report. Example (one optimiser)::

    def build(setup: Setup) -> Job:
        with setup.initial_weights():
            net = Net(cfg.net).to(setup.device)
        opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr)
        loss = lambda mods, batch, step: (F.l1_loss(mods["model"](batch.to(setup.device)), ...), {})
        return Job({"model": net}, [Phase("model", opt, loss)], batches, model_config={...})

    train(run_path, cfg, "segmenter", cfg.segmenter_train, build, resume=resume, force=force, device="auto")

Determinism: ``batches(step, rank, world)`` must be a pure function of its arguments (use
:func:`lad_fast.utils.distributed.shard_indices` / ``step_generator``); with RNG states restored from
``state.pt``, a resumed run reaches the same weights as an uninterrupted one (bit for bit on CPU).

Why one file of ~460 lines: the step loop (resume, autocast, the NaN guard, EMA, DDP/compile wrapping,
checkpoints, logging, previews) is one sequence that reads best unbroken; setup lives in
:mod:`lad_fast.train.setup`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lad_fast.config import LAD_SECTIONS, LadConfig, TrainConfig, with_defaults
from lad_fast.errors import CheckpointError, ConfigError, TrainingDivergedError
from lad_fast.runs.checkpoints import (
    Checkpoint,
    capture_rng,
    config_hash,
    restore_rng,
    save_checkpoint,
    seed_all,
    versions,
)
from lad_fast.runs.rundir import RunDir, config_diff
from lad_fast.train.ema import EMA
from lad_fast.train.setup import Setup, open_run
from lad_fast.utils.distributed import DistInfo, all_true, max_over_ranks, step_seed
from lad_fast.utils.interrupts import Interrupted, deferred
from lad_fast.utils.lock import locks_folder
from lad_fast.utils.progress import say

__all__ = ["Job", "Phase", "Setup", "TrainResult", "train"]

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
    started_at: int = 0  # the step this call started from: 0, or the resumed checkpoint's step


@dataclass(frozen=True)
class Job:
    """What a trainer's ``build(setup)`` returns: everything the loop needs to train one model.

    modules: the trained networks by name, saved as ``<name>.safetensors``; ``"model"`` is the one
        whose EMA is kept when ``ema_decay > 0``. Frozen helpers (a VQ-GAN under the diffusion model, the
        perceptual network) belong in the loss functions, not here. Modules must be on ``setup.device``.
    phases: optimiser steps run in order each step (see :class:`Phase`).
    batches: ``batches(step, rank, world) -> batch``, a pure function of its arguments; an object with
        ``state_dict``/``load_state_dict`` also has its state saved in ``state.pt``.
    model_config: JSON-ready dict (``config_to_dict(cfg.vqgan)``...) stored in ``meta.json``; resuming
        with a different one raises CheckpointError naming the fields.
    meta: extra ``meta.json`` entries (``preset``, ``data_hash``, ``latent_scale`` ...), or
        ``meta(step)`` returning them, called on rank 0 at each checkpoint (after the RNG states are
        captured, so it may evaluate the model).
    preview: ``preview(step, run_path)`` on rank 0 every ``preview_every`` steps; it cannot disturb the
        training RNG streams (they are saved and restored around it).
    finish: ``finish(result)`` on rank 0 after the last step (a final report).
    """

    modules: Mapping[str, nn.Module]
    phases: Sequence[Phase]
    batches: Callable[[int, int, int], Any]
    model_config: Mapping[str, Any]
    meta: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None
    preview: Callable[[int, Path], None] | None = None
    finish: Callable[[TrainResult], None] | None = None


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


def _build_meta(model: str, run: RunDir, job: Job, step: int) -> dict[str, Any]:
    meta = job.meta
    extra = dict(meta(step) if callable(meta) else (meta or {}))
    preset = extra.pop("preset", None)
    if preset is None and run.config_path.is_file():
        preset = run.config_dict().get("preset")
    return {
        "model": model,
        **versions(),
        "preset": preset,
        "data_hash": extra.pop("data_hash", None),
        "model_config": dict(job.model_config),
        "model_config_hash": config_hash(job.model_config),
        "extra": extra,
    }


def _check_resume(ckpt: Checkpoint, model: str, model_config: Mapping[str, Any]) -> None:
    stored = ckpt.meta.get("model_config", {})
    if ckpt.meta.get("model_config_hash") == config_hash(model_config):
        return
    # A checkpoint of an older lad-fast lacks the config fields added since; they took their defaults.
    # The VQ-GAN records its bare config section; the others record sections by name.
    section = None if any(k in LAD_SECTIONS for k in stored) or model not in LAD_SECTIONS else model
    try:
        old, new = with_defaults(stored, section), with_defaults(model_config, section)
    except (ConfigError, TypeError, ValueError):
        old, new = stored, dict(model_config)
    if old != new:
        diff = config_diff(old, new) or ["(hash differs)"]
        raise CheckpointError(
            f"cannot resume {model} from {ckpt.path}: the model config changed ({'; '.join(diff)}); "
            "resume with the original config, or start a new --run"
        )


@locks_folder("run", "train")  # one trainer per run folder (rank 0 holds it for the torchrun job)
def train(
    run: str | os.PathLike[str],
    config: LadConfig,
    model: str,
    cfg: TrainConfig,
    build: Callable[[Setup], Job],
    *,
    resume: bool = False,
    force: bool = False,
    fallback: bool = False,
    device: str | torch.device = "cpu",
    stop_at: int | None = None,
    keep: int = 2,
    data_hash: str | None = None,
) -> TrainResult:
    """Set up, build with ``build(setup)`` and train ``model`` for ``cfg.steps`` steps into ``run/<model>/``.

    run, config: the run folder and the resolved config recorded in its ``config.json``
        (:meth:`RunDir.create`: a new run, or a reopened one with a compatible config).
    model: one of ``lad_fast.runs.rundir.MODELS``; cfg: its training config (``config.<model>_train``,
    possibly
        with ``steps`` overridden).
    build: ``build(setup) -> Job`` (see :class:`Setup`, :class:`Job`), called once on every rank after the
        refusals below, with the process group joined and the run folder created.
    resume: continue from the latest complete checkpoint (starts fresh when there is none); without it
        an existing checkpoint raises OutputExistsError unless ``force`` (which deletes it, on rank 0,
        before ``build`` runs).
    fallback: on resume, skip a corrupt latest checkpoint for the previous complete one (warns).
    device: "auto", "cpu", "cuda" or "cuda:N"; under torchrun a CUDA device is ``cuda:LOCAL_RANK``.
    stop_at: stop after this many completed steps with a checkpoint, as if interrupted (a time budget).
    data_hash: when given, resuming a checkpoint whose ``meta.json`` records another ``data_hash``
        raises CheckpointError (the training data changed).
    """
    if cfg.amp not in AMP_DTYPES:
        raise ConfigError(f"{model}_train.amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.amp!r}")
    from lad_fast.utils.threads import apply_thread_policy

    apply_thread_policy()  # torch threads from the CPU affinity (lad_fast/utils/threads.py)
    setup, ckpt = open_run(
        run,
        config,
        model,
        cfg.seed,
        resume=resume,
        force=force,
        fallback=fallback,
        device=device,
        data_hash=data_hash,
    )
    rundir, device, info = setup.run, setup.device, setup.dist
    model_dir = rundir.model_dir(model)
    job = build(setup)
    modules, phases, batches = job.modules, job.phases, job.batches
    if cfg.ema_decay > 0 and "model" not in modules:
        raise ConfigError(f"ema_decay > 0 needs a module named 'model' (got {', '.join(modules)})")
    if not phases:
        raise ConfigError("train() needs at least one Phase")
    if ckpt is not None:
        _check_resume(ckpt, model, job.model_config)

    scalers = {ph.name: torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16") for ph in phases}
    ema = EMA(modules["model"], cfg.ema_decay) if cfg.ema_decay > 0 else None
    step, guard = 0, _Guard(model, cfg.max_bad_steps)
    if ckpt is None:
        # Dropout and other in-step noise: a function of (seed, rank), whatever the caller drew before.
        seed_all(step_seed(cfg.seed, -1, info.rank))
        if info.is_main:
            # Lines of an earlier attempt stopped before its first checkpoint: those steps run again.
            rundir.truncate_log(model, after_step=-1)
            if resume:
                say(f"{model}: no checkpoint in {model_dir} to resume; starting at step 0 of {cfg.steps}")
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
            rundir.truncate_log(model, after_step=step)  # the lost steps are trained again and re-logged
            rundir.log({"model": model, "event": "resume", "step": step, "checkpoint": ckpt.path.name})
            say(
                f"{model}: already trained ({step} of {cfg.steps} steps, {ckpt.path})"
                if step >= cfg.steps
                else f"{model}: resuming at step {step} of {cfg.steps} from {ckpt.path}"
            )

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
        ema_tensors = {"ema": ema.state_dict()} if ema is not None else None
        meta = _build_meta(model, rundir, job, at)
        path = save_checkpoint(
            model_dir, at, modules=modules, tensors=ema_tensors, state=state, meta=meta, keep=keep
        )
        rundir.log({"model": model, "event": "checkpoint", "step": at, "checkpoint": path.name})
        return path

    started_at, end = step, (cfg.steps if stop_at is None else min(cfg.steps, stop_at))
    saved_at, last_path = step, (ckpt.path if ckpt is not None else None)
    window: dict[str, list[float]] = {}
    last_means: dict[str, float] = {}
    t_start = t_window = time.perf_counter()
    window_steps = 0
    vols_per_step = cfg.batch_size * info.world

    from lad_fast.utils.progress import make_progress

    bar = make_progress() if info.is_main else contextlib.nullcontext()
    stopped_by = 0  # the signal (SIGINT / SIGTERM) that stopped training early, 0 when none did
    stopping = f"after the current {model} step, with a checkpoint"
    with deferred(stopping) as stop, bar as progress:
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
                        rundir.log(
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
                    rundir.log({"model": model, "event": "fp16_overflow", "step": step + 1, "phase": ph.name})
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
                    rundir.log(
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
                if job.preview is not None and cfg.preview_every > 0 and step % cfg.preview_every == 0:
                    rng = capture_rng()  # previews draw noise; training streams must not notice
                    job.preview(step, rundir.path)
                    restore_rng(rng)
            if step % max(cfg.checkpoint_every, 1) == 0 or step == end:
                last_path = save(step) or last_path
                saved_at = step
            # torchrun forwards a signal to every worker, but they may see it at different steps
            stopped_by = max_over_ranks(stop.signum or 0, info, device)
            if stopped_by:
                break
        if not stopped_by:  # a signal after the last check (or with no step to run) must not be lost
            stopped_by = max_over_ranks(stop.signum or 0, info, device)
    if stopped_by:
        if saved_at != step:
            last_path = save(step) or last_path
        wrapped.clear()  # as below: DDP reducers go while the process group is alive
        gc.collect()
        where = f"; checkpoint {last_path}" if last_path is not None else ""
        raise Interrupted(
            stopped_by,
            f"{model} stopped after step {step} of {cfg.steps}{where}",
            resume_flag="--resume",
        )
    if saved_at != step:  # defensive: the loop above always saves at ``end``
        last_path = save(step) or last_path
    result = TrainResult(
        step=step, bad_steps=guard.bad, losses=last_means, checkpoint=last_path, started_at=started_at
    )
    if info.is_main and job.finish is not None:
        job.finish(result)
    # Free the DDP wrappers (and their gradient reducers) now, while the process group is alive: left to
    # the garbage collector, a reducer could be torn down after the group at exit, which aborted a gloo
    # rank ("terminate called without an active exception") in about one two-process run in four.
    wrapped.clear()
    gc.collect()
    return result
