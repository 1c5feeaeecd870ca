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

Layout: :func:`train` reads as its steps (set up, build, start or restore, run, save, report); the
state they share and each step's code live in the private ``_Loop``; :func:`_run_phase` is one
optimiser step. Set-up lives in :mod:`lad_fast.train.setup`.
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


@dataclass
class _Window:
    """The values logged since the last log line, over ``steps`` steps from ``began`` (perf_counter)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    began: float = field(default_factory=time.perf_counter)


@dataclass
class _Bar:
    """The progress bar of one model on rank 0; without one (other ranks) its methods do nothing."""

    progress: Any = None
    task: Any = None

    def status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, status=text)

    def at(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)


class _Loop:
    """One call's training state between set-up and result (``step``: completed steps; the grad scalers,
    EMA weights and bad-step count; what was saved last), and the named steps that move it on: start or
    restore, train one step, log, preview, save."""

    def __init__(self, model: str, cfg: TrainConfig, setup: Setup, job: Job, keep: int) -> None:
        self.model, self.cfg, self.job, self.keep = model, cfg, job, keep
        self.run, self.device, self.info = setup.run, setup.device, setup.dist
        self.model_dir = self.run.model_dir(model)
        self.scalers = {
            ph.name: torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16") for ph in job.phases
        }
        self.ema = EMA(job.modules["model"], cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.guard = _Guard(model, cfg.max_bad_steps)
        self.step = self.saved_at = 0
        self.last_path: Path | None = None
        self.last_means: dict[str, float] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.t_start = 0.0  # when run_until began (perf_counter)

    # -------------------------------------------------------------------------------- start / restore

    def start(self, resume: bool) -> None:
        """No checkpoint to continue: dropout and other in-step noise become a function of (seed, rank),
        whatever the caller drew before."""
        seed_all(step_seed(self.cfg.seed, -1, self.info.rank))
        if self.info.is_main:
            # Lines of an earlier attempt stopped before its first checkpoint: those steps run again.
            self.run.truncate_log(self.model, after_step=-1)
            if resume:
                say(f"{self.model}: no checkpoint in {self.model_dir} to resume; starting at step 0 of "
                    f"{self.cfg.steps}")  # fmt: skip

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: weights, optimisers, schedulers, grad scalers, EMA weights, the batches'
        state, the step and bad-step counts, and the RNG streams of every rank."""
        modules, st = self.job.modules, ckpt.state
        for name, m in modules.items():
            ckpt.load_module(name, m)
        self._restore_optimisers(ckpt)
        if self.ema is not None:
            self.ema.load_state_dict(
                ckpt.tensors("ema") if ckpt.has("ema") else modules["model"].state_dict()
            )
        if st.get("data") is not None and hasattr(self.job.batches, "load_state_dict"):
            self.job.batches.load_state_dict(st["data"])
        self.step, self.guard.bad = int(st["step"]), int(st["bad_steps"])
        self.saved_at, self.last_path = self.step, ckpt.path
        ranks = st.get("rng_ranks") or []
        if len(ranks) == self.info.world:
            restore_rng(ranks[self.info.rank])
        else:  # another world size: rank 0 continues its stream, the others start fresh ones
            restore_rng(st["rng"])
            if self.info.rank > 0:
                seed_all(step_seed(self.cfg.seed, self.step, self.info.rank))
        if self.info.is_main:
            self.run.truncate_log(self.model, after_step=self.step)  # the lost steps are trained again
            self.run.log(
                {"model": self.model, "event": "resume", "step": self.step, "checkpoint": ckpt.path.name}
            )
            say(
                f"{self.model}: already trained ({self.step} of {self.cfg.steps} steps, {ckpt.path})"
                if self.step >= self.cfg.steps
                else f"{self.model}: resuming at step {self.step} of {self.cfg.steps} from {ckpt.path}"
            )

    def _restore_optimisers(self, ckpt: Checkpoint) -> None:
        st, phases = ckpt.state, self.job.phases
        try:
            for ph in phases:
                ph.optimizer.load_state_dict(st["optimizers"][ph.name])
                if ph.scheduler is not None:
                    ph.scheduler.load_state_dict(st["schedulers"][ph.name])
                self.scalers[ph.name].load_state_dict(st["scalers"][ph.name])
        except (KeyError, ValueError) as err:
            raise CheckpointError(
                f"{ckpt.path / 'state.pt'} does not match this training setup (phases "
                f"{[ph.name for ph in phases]}, saved {sorted(st.get('optimizers', {}))}: {err}); "
                "resume with the code and options that wrote it, or start a new --run"
            ) from err

    def wrap(self) -> None:
        """DDP / torch.compile wrappers for the steps, every module in training mode."""
        self.wrapped = _wrap(self.job.modules, self.cfg, self.device, self.info)
        for m in self.job.modules.values():
            m.train()

    # -------------------------------------------------------------------------------------- the steps

    def run_until(self, end: int) -> int:
        """Train until ``step == end``, logging, previewing and saving on the way; returns the signal
        (SIGINT / SIGTERM) that stopped it early, 0 when none did. torchrun forwards a signal to every
        worker, but they may see it at different steps: the ranks agree on it after every step."""
        from lad_fast.utils.progress import make_progress

        cfg, info = self.cfg, self.info
        self.t_start = time.perf_counter()
        bar = make_progress() if info.is_main else contextlib.nullcontext()
        stopping = f"after the current {self.model} step, with a checkpoint"
        with deferred(stopping) as stop, bar as progress:
            shown, window = _Bar(progress), _Window(began=self.t_start)
            if progress is not None:
                shown.task = progress.add_task(self.model, total=cfg.steps, completed=self.step, status="")
            while self.step < end:
                self.train_step(window)
                if self.step % max(cfg.log_every, 1) == 0 or self.step == end:
                    window = self.log(window, shown)
                if info.is_main:
                    shown.at(self.step)
                    self.preview()
                if self.step % max(cfg.checkpoint_every, 1) == 0 or self.step == end:
                    self.save()
                stopped_by = max_over_ranks(stop.signum or 0, info, self.device)
                if stopped_by:
                    return stopped_by
            # a signal after the last check (or with no step to run) must not be lost
            return max_over_ranks(stop.signum or 0, info, self.device)

    def train_step(self, window: _Window) -> None:
        """One step: the batch, every phase that has started (in order), then the EMA update."""
        step, info = self.step, self.info
        batch = self.job.batches(step, info.rank, info.world)
        stepped = False
        for ph in self.job.phases:
            if step < ph.start_step:
                continue
            scaler = self.scalers[ph.name]
            outcome, logs = _run_phase(ph, self.wrapped, batch, step, self.cfg, scaler, self.device, info)
            if ph.scheduler is not None:
                ph.scheduler.step()
            self._record(outcome, ph.name)
            stepped |= outcome == "ok"
            for k, v in logs.items():
                window.values.setdefault(k, []).append(v)
        if stepped and self.ema is not None:
            self.ema.update(self.job.modules["model"])
        self.step += 1
        window.steps += 1

    def _record(self, outcome: str, phase: str) -> None:
        """Log a skipped step (counted against ``max_bad_steps``) or an fp16 overflow of this step."""
        at = self.step + 1
        if outcome in ("loss", "gradient"):
            if self.info.is_main:
                self.run.log({"model": self.model, "event": "bad_step", "step": at, "phase": phase,
                              "non_finite": outcome, "bad_steps": self.guard.bad + 1})  # fmt: skip
            self.guard.record(at, phase, outcome)
        elif outcome == "overflow" and self.info.is_main:
            self.run.log({"model": self.model, "event": "fp16_overflow", "step": at, "phase": phase})

    def log(self, window: _Window, shown: _Bar) -> _Window:
        """One ``log.jsonl`` line (rank 0) with the window's mean values, learning rates and volumes per
        second, and the bar's status; returns the next window."""
        now = time.perf_counter()
        self.last_means = {k: sum(v) / len(v) for k, v in window.values.items() if v}
        vol_s = window.steps * self.cfg.batch_size * self.info.world / max(now - window.began, 1e-9)
        if self.info.is_main:
            self.run.log(
                {
                    "model": self.model,
                    "step": self.step,
                    "losses": self.last_means,
                    "lr": {ph.name: ph.optimizer.param_groups[0]["lr"] for ph in self.job.phases},
                    "vol_s": round(vol_s, 3),
                    "elapsed_s": round(now - self.t_start, 3),
                    "time": time.time(),
                    "bad_steps": self.guard.bad,
                }
            )
        status = " ".join(f"{k} {v:.4g}" for k, v in self.last_means.items() if "grad_norm" not in k)
        shown.status(f"{status} {vol_s:.2f} vol/s")
        return _Window(began=now)

    def preview(self) -> None:
        """The job's preview when one is due (rank 0), outside the training RNG streams."""
        job, every = self.job, self.cfg.preview_every
        if job.preview is None or every <= 0 or self.step % every != 0:
            return
        rng = capture_rng()  # previews draw noise; training streams must not notice
        job.preview(self.step, self.run.path)
        restore_rng(rng)

    # ------------------------------------------------------------------------------- save / release

    def save(self) -> None:
        """A checkpoint of the current step: every rank gives its RNG state, rank 0 writes."""
        self.last_path = self._write_checkpoint(self.step) or self.last_path
        self.saved_at = self.step

    def save_if_unsaved(self) -> None:
        if self.saved_at != self.step:
            self.save()

    def _write_checkpoint(self, at: int) -> Path | None:
        # Every rank's RNG state goes into state.pt, so a resumed DDP run continues each rank's stream.
        info, phases = self.info, self.job.phases
        rngs: list[Any] = [capture_rng()]
        if info.enabled:
            rngs = [None] * info.world
            torch.distributed.all_gather_object(rngs, capture_rng())
        if not info.is_main:
            return None
        batches = self.job.batches
        state = {
            "step": at,
            "bad_steps": self.guard.bad,
            "world": info.world,
            "rng": rngs[0],
            "rng_ranks": rngs,
            "optimizers": {ph.name: ph.optimizer.state_dict() for ph in phases},
            "schedulers": {ph.name: ph.scheduler.state_dict() for ph in phases if ph.scheduler is not None},
            "scalers": {name: s.state_dict() for name, s in self.scalers.items()},
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
        }
        ema_tensors = {"ema": self.ema.state_dict()} if self.ema is not None else None
        meta = _build_meta(self.model, self.run, self.job, at)
        path = save_checkpoint(
            self.model_dir,
            at,
            modules=self.job.modules,
            tensors=ema_tensors,
            state=state,
            meta=meta,
            keep=self.keep,
        )
        self.run.log({"model": self.model, "event": "checkpoint", "step": at, "checkpoint": path.name})
        return path

    def release(self) -> None:
        """Free the DDP wrappers (and their gradient reducers) while the process group is alive: left to
        the garbage collector, a reducer torn down after the group at exit can abort a gloo rank."""
        self.wrapped.clear()
        gc.collect()


def _check_job(model: str, cfg: TrainConfig, job: Job, ckpt: Checkpoint | None) -> None:
    """ConfigError for a job the loop cannot train; CheckpointError when ``ckpt`` has another model config."""
    if cfg.ema_decay > 0 and "model" not in job.modules:
        raise ConfigError(f"ema_decay > 0 needs a module named 'model' (got {', '.join(job.modules)})")
    if not job.phases:
        raise ConfigError("train() needs at least one Phase")
    if ckpt is not None:
        _check_resume(ckpt, model, job.model_config)


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
        possibly with ``steps`` overridden).
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
    Raises Interrupted (after saving a checkpoint of the last step) when SIGINT / SIGTERM stopped it.
    """
    if cfg.amp not in AMP_DTYPES:
        raise ConfigError(f"{model}_train.amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.amp!r}")
    from lad_fast.utils.threads import apply_thread_policy

    apply_thread_policy()  # torch threads from the CPU affinity
    setup, ckpt = open_run(run, config, model, cfg.seed, resume=resume, force=force, fallback=fallback,
                           device=device, data_hash=data_hash)  # fmt: skip
    job = build(setup)
    _check_job(model, cfg, job, ckpt)
    loop = _Loop(model, cfg, setup, job, keep)
    if ckpt is None:
        loop.start(resume)
    else:
        loop.restore(ckpt)
    loop.wrap()
    started_at = loop.step
    stopped_by = loop.run_until(cfg.steps if stop_at is None else min(cfg.steps, stop_at))
    loop.save_if_unsaved()  # after a signal; the loop itself always saves its last step
    if stopped_by:
        loop.release()
        where = f"; checkpoint {loop.last_path}" if loop.last_path is not None else ""
        message = f"{model} stopped after step {loop.step} of {cfg.steps}{where}"
        raise Interrupted(stopped_by, message, resume_flag="--resume")
    result = TrainResult(step=loop.step, bad_steps=loop.guard.bad, losses=loop.last_means,
                         checkpoint=loop.last_path, started_at=started_at)  # fmt: skip
    if setup.is_main and job.finish is not None:
        job.finish(result)
    loop.release()
    return result
