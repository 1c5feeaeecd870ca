"""What one training step of each model costs on a GPU, before any run; the refusal of one that cannot fit.

For the VQ-GAN (with its discriminators and, when its weight is on, the perceptual network), the
diffusion U-Net (with its EMA weights), the segmenter, the SSL pretraining network and the fine-tuned
segmenter, :func:`build_step` builds the modules, optimisers, losses and a batch as their trainers do
(``lad_fast/train/vqgan.py``, ``diffusion.py``, ``segmenter.py``, ``ssl.py``: the same constructors, the
same loss code) and runs the shared loop's step: per phase ``zero_grad(set_to_none)``, the loss under the
training config's autocast, ``backward``, gradient clipping, the optimiser step; then the EMA update.
:func:`plan_step` runs it on fake tensors on the CUDA kernel path (:mod:`lad_fast.generate.plan`), from
the state a previous step leaves (optimiser state created, gradients held), and reports its peak with
the breakdown (weights, gradients, optimiser state, EMA, inputs, activations, autocast copies, backward
and optimiser temporaries), FLOPs and a roofline time per GPU. The optimiser is the trainer's, with the
foreach implementation PyTorch picks for CUDA parameters.

What is not modelled: ``torch.compile`` (the loop compiles on CUDA when ``compile`` is on; the trace is
the eager step, whose peak and memory traffic a compiled graph can only lower), DDP's gradient buckets
(about one more copy of the gradients per rank under torchrun), workspaces of cuDNN, cuBLAS and Triton,
and the allocator's rounding (the fit rule keeps 10% of the GPU for them,
:data:`lad_fast.utils.gpu_specs.FIT_FRACTION`).

:func:`check_fits` is what ``lad-fast train`` calls on CUDA before any work: it raises a one-line
:class:`~lad_fast.errors.ConfigError` naming the largest batch that fits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lad_fast.config import LadConfig, TrainConfig
from lad_fast.errors import ConfigError
from lad_fast.generate.plan import fake_module, largest_fitting, on_meta, tracing, weights
from lad_fast.utils.fake_trace import TensorTracker, Trace
from lad_fast.utils.gpu_specs import GPU, roofline_seconds

# The models the shared loop trains, by their run folder names (lad_fast.runs.rundir.MODELS); "finetune"
# is the segmenter fine-tuned from SSL pretraining, on its own budget.
MODELS = ("vqgan", "diffusion", "segmenter", "ssl", "finetune")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

LossFn = Callable[[Mapping[str, nn.Module], dict[str, Any], int], "tuple[torch.Tensor, Any]"]


@dataclass
class _Phase:
    optimizer: torch.optim.Optimizer
    loss: LossFn
    start_step: int = 0


@dataclass
class TrainStep:
    """One model's training step as the shared loop runs it. ``modules``: the trained networks by the
    trainer's names; ``helpers``: modules the losses use besides (a discriminator whose weight is 0, the
    frozen perceptual network); ``batch`` is on the device; ``ema``: the EMA of ``modules["model"]``."""

    model: str
    tcfg: TrainConfig
    modules: dict[str, nn.Module]
    phases: list[_Phase]
    batch: dict[str, Any]
    helpers: list[nn.Module] = field(default_factory=list)
    ema: Any = None
    foreach: bool | None = None

    def run(self, step: int, tracker: TensorTracker | None = None) -> None:
        """Every phase active at ``step``, then the EMA update: the loop's step without its guards.
        ``tracker``: each part of the step is a category of it (activations, backward and optimiser
        temporaries)."""
        amp = AMP[self.tcfg.amp]

        def mark(name: str, autocast: torch.dtype | None = None) -> Any:
            return tracker.category(name, autocast) if tracker is not None else contextlib.nullcontext()

        for ph in self.phases:
            if step < ph.start_step:
                continue
            opt = ph.optimizer
            opt.zero_grad(set_to_none=True)
            # A plan's fake tensors are CPU ones (lad_fast/utils/fake_trace.py says why): CPU autocast stands
            # in for CUDA's, with the same lower-precision list for convolutions and matrix products.
            ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
            with mark("activations", amp), ctx:
                loss, _ = ph.loss(self.modules, self.batch, step)
            with mark("backward temporaries"):
                loss.backward()
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                clip = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else float("inf")
                if params:
                    torch.nn.utils.clip_grad_norm_(params, clip, foreach=self.foreach)
            with mark("optimizer temporaries"):
                opt.step()
        if self.ema is not None:
            with mark("optimizer temporaries"):
                self.ema.update(self.modules["model"])

    def trainable(self) -> list[torch.Tensor]:
        return [p for ph in self.phases for g in ph.optimizer.param_groups for p in g["params"]]

    def prime(self) -> None:
        """The state after a first step, without running one: optimiser state created (a step over zero
        gradients) and every trainable parameter holding a gradient, as the previous step leaves them."""
        for ph in self.phases:
            for g in ph.optimizer.param_groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            ph.optimizer.step()

    def measure(self, step: int) -> Trace:
        """Run one step at ``step`` (after :meth:`prime`) inside a :class:`TensorTracker` and return what
        it saw; works on fake and on real tensors."""
        self.prime()
        tracker = TensorTracker()
        for m in [*self.modules.values(), *self.helpers]:
            tracker.track(weights(m), "weights")
        for opt in self.optimizers():
            tracker.track(
                [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)],
                "optimizer state",
            )
        tracker.track([p.grad for p in self.trainable() if p.grad is not None], "gradients")
        if self.ema is not None:
            tracker.track(self.ema.shadow.values(), "EMA weights")
        tracker.track([t for t in self.batch.values() if isinstance(t, torch.Tensor)], "inputs")
        handles = [
            p.register_post_accumulate_grad_hook(lambda p: tracker.retag([p.grad], "gradients"))
            for p in self.trainable()
        ]
        try:
            with tracker:
                self.run(step, tracker)
        finally:
            for h in handles:
                h.remove()
        return tracker.trace

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [ph.optimizer for ph in self.phases]


# ------------------------------------------------------------------------------------ the steps

# (modules by name, helper modules, phases, batch)
_Built = tuple[dict[str, nn.Module], list[nn.Module], list[_Phase], dict[str, Any]]


def train_config(cfg: LadConfig, model: str) -> TrainConfig:
    """The training config of ``model`` in ``cfg`` (SSL pretraining and fine-tuning: their budgets for
    the preset, :mod:`lad_fast.ssl.settings`)."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; plan one of {', '.join(MODELS)}")
    if model in ("ssl", "finetune"):
        from lad_fast.ssl.settings import FINETUNE, PRETRAIN
        from lad_fast.ssl.settings import train_config as ssl_config

        return ssl_config(PRETRAIN if model == "ssl" else FINETUNE, cfg.preset, None, 0)
    return getattr(cfg, f"{model}_train")


def _vqgan(cfg: LadConfig, b: int, tcfg: TrainConfig, cpu_layout: bool) -> _Built:
    from lad_fast.data.labels import NUM_CLASSES
    from lad_fast.models.segmenter import Segmenter
    from lad_fast.models.vqgan import VQGAN
    from lad_fast.train.losses import SlicePerceptualLoss, VQGANLoss, make_discriminators
    from lad_fast.train.vqgan import _Features, _GANSteps

    lc = cfg.vqgan_loss
    model = VQGAN(cfg.vqgan)
    # the perceptual network is a lad-fast segmenter run's encoder (train/vqgan.py _perceptual_loss)
    perceptual = (
        SlicePerceptualLoss(_Features(Segmenter(cfg.segmenter, NUM_CLASSES)), spatial_dims=3)
        if lc.perceptual > 0
        else None
    )
    discs = make_discriminators(lc, cfg.vqgan.in_channels)
    if cpu_layout:  # the trainer's CPU layout (train/vqgan.py): channels-last-3d model and input
        model = model.to(memory_format=torch.channels_last_3d)
    modules: dict[str, nn.Module] = {"model": model}
    if lc.gan_2d > 0:
        modules["disc2d"] = discs[0]
    if lc.gan_3d > 0:
        modules["disc3d"] = discs[1]
    locality = bool(lc.locality_organs) and any(w != 0 for w in lc.locality_weights)
    gan = _GANSteps(VQGANLoss(lc), discs, perceptual, torch.device("cpu"), locality, handoff=len(modules) > 1)

    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)

    phases = [_Phase(adam(model.parameters()), gan.generator)]
    disc_params = [p for n in ("disc2d", "disc3d") if n in modules for p in modules[n].parameters()]
    if disc_params:
        phases.append(_Phase(adam(disc_params), gan.discriminator, lc.gan_start_step))
    helpers = [d for d in discs if all(d is not m for m in modules.values())]
    helpers += [perceptual] if perceptual is not None else []
    image = torch.zeros(b, cfg.vqgan.in_channels, *cfg.geometry.shape)
    if cpu_layout:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    mask = torch.randint(0, NUM_CLASSES, (b, *cfg.geometry.shape)) if locality else None
    return modules, helpers, phases, {"image": image, "mask": mask}


def _diffusion(cfg: LadConfig, b: int, tcfg: TrainConfig) -> _Built:
    from lad_fast.conditioning.conditions import structure_dim
    from lad_fast.diffusion.schedules import diffusion_loss, make_schedule
    from lad_fast.models.unet import build_unet
    from lad_fast.train.schedule import make_adamw

    f = 2 ** (len(cfg.vqgan.channels) - 1)
    latent = (cfg.vqgan.code_dim, *(s // f for s in cfg.geometry.shape))
    struct = structure_dim(cfg.geometry.shape[0], cfg.condition)
    net = build_unet(cfg.unet, cfg.condition, latent[0], struct)

    def loss(mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int) -> tuple[torch.Tensor, Any]:
        # A DDPM schedule's tables are data the loss indexes: made here, as the traced step's own tensors
        # (a few KB), not on the meta device where the modules are built.
        with torch.device("cpu"):
            sched = make_schedule(cfg.diffusion)
        # train/diffusion.py's loss: the embedding on the bare module, the spatial condition beside x
        emb = net.embed_condition(batch["content"], batch["structure"], batch["keep"])
        model = mods["model"]
        spatial = (batch["spatial"],) if "spatial" in batch else ()
        gen = torch.Generator().manual_seed(step)
        value = diffusion_loss(
            lambda x, t: model(x, t, emb, *spatial), batch["x0"], sched, cfg.diffusion, gen
        )
        return value, {}

    batch = {
        "x0": torch.zeros(b, *latent),
        "content": torch.zeros(b, *latent),
        "structure": torch.zeros(b, struct),
        "keep": torch.ones(b),
    }
    if net.spatial_channels:
        batch["spatial"] = torch.zeros(b, net.spatial_channels, *latent[1:])
    return {"model": net}, [], [_Phase(make_adamw(net, tcfg), loss)], batch


def _segmenter(cfg: LadConfig, b: int, tcfg: TrainConfig) -> _Built:
    from lad_fast.data.labels import NUM_CLASSES
    from lad_fast.models.segmenter import Segmenter, dice_loss
    from lad_fast.train.schedule import make_adamw

    net = Segmenter(cfg.segmenter, NUM_CLASSES)

    def loss(mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int) -> tuple[torch.Tensor, Any]:
        return dice_loss(mods["model"](batch["image"]), batch["mask"]), {}

    batch = {
        "image": torch.zeros(b, 1, *cfg.geometry.shape),
        "mask": torch.randint(0, NUM_CLASSES, (b, *cfg.geometry.shape)),
    }
    return {"model": net}, [], [_Phase(make_adamw(net, tcfg), loss)], batch


def _ssl(cfg: LadConfig, b: int, tcfg: TrainConfig) -> _Built:
    from lad_fast.ssl.network import SSLNet
    from lad_fast.ssl.objectives import ROTATIONS, inpainting_loss, rotation_loss
    from lad_fast.ssl.settings import SSLConfig
    from lad_fast.train.schedule import make_adamw

    ssl = SSLConfig()
    net = SSLNet(cfg.segmenter)

    def loss(mods: Mapping[str, nn.Module], batch: dict[str, Any], step: int) -> tuple[torch.Tensor, Any]:
        # train/ssl.py's pretraining loss
        rec, logits = mods["model"](batch["input"])
        l_rec = inpainting_loss(rec, batch["target"], batch["mask"])
        return l_rec + ssl.rotation_weight * rotation_loss(logits, batch["rotation"]), {}

    shape = (b, 1, *cfg.geometry.shape)
    batch = {
        "input": torch.zeros(shape),
        "target": torch.zeros(shape),
        "mask": torch.zeros(shape, dtype=torch.bool),
        "rotation": torch.randint(0, ROTATIONS, (b,)),
    }
    return {"model": net}, [], [_Phase(make_adamw(net, tcfg), loss)], batch


def build_step(
    cfg: LadConfig,
    model: str,
    batch: int | None = None,
    *,
    tcfg: TrainConfig | None = None,
    fake: bool = True,
    gpu: bool = True,
) -> TrainStep:
    """``model``'s training step at ``batch`` (default: the training config's), built as its trainer
    builds it. tcfg: the training config (default: :func:`train_config`; the loop passes its own).

    fake: built for a plan, inside :func:`lad_fast.generate.plan.tracing` (modules on the meta device,
    then given fake weights: nothing is allocated); False builds real CPU modules, to run a real step.
    gpu: the CUDA step (foreach optimiser, no CPU memory layout) rather than the CPU one; the kernel path
    is the caller's (``tracing(gpu)``).
    """
    from lad_fast.train.ema import EMA

    tcfg = tcfg or train_config(cfg, model)
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; plan one of {', '.join(MODELS)}")
    b = tcfg.batch_size if batch is None else batch
    if b < 1:
        raise ConfigError(f"--batch must be at least 1, got {b}")
    if tcfg.amp not in AMP:
        raise ConfigError(f"{model}_train.amp must be one of {', '.join(AMP)}, got {tcfg.amp!r}")
    tcfg = replace(tcfg, batch_size=b)
    build = {
        "vqgan": lambda: _vqgan(cfg, b, tcfg, cpu_layout=not gpu),
        "diffusion": lambda: _diffusion(cfg, b, tcfg),
        "segmenter": lambda: _segmenter(cfg, b, tcfg),
        "ssl": lambda: _ssl(cfg, b, tcfg),
        "finetune": lambda: _segmenter(cfg, b, tcfg),  # train/ssl.py finetune: the segmenter's loss
    }[model]
    with on_meta() if fake else contextlib.nullcontext():
        modules, helpers, phases, inputs = build()
    if fake:
        swapped: dict[int, torch.Tensor] = {}
        for m in [*modules.values(), *helpers]:
            fake_module(m, swapped)
        for ph in phases:  # the optimisers were built over the meta parameters
            for g in ph.optimizer.param_groups:
                g["params"] = [swapped[id(p)] for p in g["params"]]
        inputs = {k: _materialise(v) for k, v in inputs.items()}
    for m in modules.values():
        m.train()
    ema = EMA(modules["model"], tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    # the foreach optimiser is PyTorch's default for CUDA parameters, per tensor on a CPU
    foreach = True if gpu else None
    for ph in phases:
        for g in ph.optimizer.param_groups:
            g["foreach"] = foreach
    return TrainStep(model, tcfg, modules, phases, inputs, helpers, ema, foreach)


def _materialise(t: Any) -> Any:
    """A tensor built on the meta device as a (fake) tensor of the same shape, dtype and layout."""
    if not isinstance(t, torch.Tensor):
        return t
    out = torch.zeros(t.shape, dtype=t.dtype)
    last = t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last_3d) if last else out


# ------------------------------------------------------------------------------------ the plan

# Categories of a step's memory that grow with the batch; the others (weights, gradients, optimiser
# state, EMA weights, optimiser temporaries) do not.
PER_SAMPLE = ("inputs", "activations", "autocast copies", "backward temporaries")


@dataclass(frozen=True)
class StepPlan:
    """The predicted cost of one training step of ``model`` at ``batch``.

    peak: bytes at the step's peak, ``peak_by`` its breakdown by category; blocks: per part of the step
    (activations: the forward, backward temporaries, optimiser temporaries) its own peak and breakdown,
    from which :meth:`peak_at` scales the per-sample categories (:data:`PER_SAMPLE`) to another batch.
    flops, costs: of the step with the highest peak (the VQ-GAN's with its GAN terms), per op for
    :meth:`seconds`; regimes: ``(steps, costs per op)`` for the parts of the budget whose steps differ
    (the VQ-GAN before and after its GAN terms start), for :meth:`hours`.
    """

    model: str
    batch: int
    steps: int
    parameters: int
    optimizer: str
    amp: str
    compile: bool
    peak: int
    peak_by: dict[str, int]
    blocks: dict[str, tuple[int, dict[str, int]]]
    flops: int
    costs: list[tuple[int, int]] = field(repr=False)
    regimes: list[tuple[int, list[tuple[int, int]]]] = field(repr=False)

    def peak_at(self, batch: int) -> int:
        """Predicted peak at another batch: in each block, the per-sample categories scaled by
        ``batch / self.batch``, the others kept; the largest block's."""
        scale = batch / self.batch
        return max(
            int(sum(v * (scale if k in PER_SAMPLE else 1.0) for k, v in by.items()))
            for _, by in self.blocks.values()
        )

    def largest_batch(self, gpu: GPU) -> int:
        """The largest batch whose predicted peak fits ``gpu`` (0: not even batch 1)."""
        return largest_fitting(self.peak_at, gpu.usable, self.batch)

    def seconds(self, gpu: GPU) -> float | None:
        """Predicted time of the step (:func:`lad_fast.utils.gpu_specs.roofline_seconds`)."""
        return roofline_seconds(self.costs, gpu)

    def hours(self, gpu: GPU) -> float | None:
        """Predicted hours for the preset's step budget on one ``gpu``."""
        if gpu.bf16 is None:
            return None
        return sum(n * roofline_seconds(costs, gpu) for n, costs in self.regimes) / 3600.0


def plan_step(
    cfg: LadConfig, model: str, batch: int | None = None, gpu: bool = True, tcfg: TrainConfig | None = None
) -> StepPlan:
    """Trace ``model``'s training step of ``cfg`` at ``batch`` (default: the training config's) on fake
    tensors: on the CUDA path (``gpu``) or the CPU's. tcfg: as :func:`build_step`."""
    tcfg = tcfg or train_config(cfg, model)
    with tracing(gpu):
        step = build_step(cfg, model, batch, tcfg=tcfg, gpu=gpu)
        # Regimes: steps whose phases differ (the VQ-GAN's discriminator phase from gan_start_step on).
        starts = sorted({0, *(ph.start_step for ph in step.phases if 0 < ph.start_step < tcfg.steps)})
        bounds = [*starts, tcfg.steps]
        traces = [(bounds[i + 1] - s, step.measure(s)) for i, s in enumerate(starts)]
        params = sum(p.numel() for p in step.trainable())
        opt = type(step.phases[0].optimizer).__name__
    main = max((t for _, t in traces), key=lambda t: t.peak)
    blocks: dict[str, tuple[int, dict[str, int]]] = {}
    for _, t in traces:
        for name, (peak, by) in t.block_peaks.items():
            if name not in blocks or peak > blocks[name][0]:
                blocks[name] = (peak, by)
    return StepPlan(
        model=model,
        batch=step.tcfg.batch_size,
        steps=tcfg.steps,
        parameters=params,
        optimizer=opt,
        amp=tcfg.amp,
        compile=tcfg.compile,
        peak=main.peak,
        peak_by=main.peak_by,
        blocks=blocks,
        flops=main.flops,
        costs=main.costs,
        regimes=[(n, t.costs) for n, t in traces],
    )


def plan_training(cfg: LadConfig, batch: int | None = None, gpu: bool = True) -> list[StepPlan]:
    """:func:`plan_step` for every model of :data:`MODELS`."""
    return [plan_step(cfg, m, batch, gpu) for m in MODELS]


# ------------------------------------------------------------------------------------ the refusal


def check_fits(
    cfg: LadConfig, model: str, tcfg: TrainConfig, memory: int, name: str = "this GPU"
) -> StepPlan:
    """What ``lad-fast train`` calls on CUDA before any work: ConfigError, in one line, when ``model``'s
    training step with ``tcfg`` (its batch, amp, EMA) is predicted not to fit ``memory`` bytes (at most
    :data:`~lad_fast.utils.gpu_specs.FIT_FRACTION` of them), naming the largest batch whose traced step
    fits. Returns the plan otherwise. ``name`` names the GPU in the message.
    """
    plan = plan_step(cfg, model, tcfg=tcfg)
    gpu = GPU(name, memory)
    if plan.peak <= gpu.usable:
        return plan
    fits = _largest_traced(cfg, model, tcfg, plan, gpu)
    GiB = 2**30
    advice = (
        f"use --batch {fits} or less ({SKIP_ENV}=1 skips this check)"
        if fits
        else "no batch fits: use a GPU with more memory"
    )
    raise ConfigError(
        f"{model} training at batch {tcfg.batch_size} needs {plan.peak / GiB:.1f} GiB (predicted), more "
        f"than the {gpu.usable / GiB:.1f} GiB usable of {name}'s {memory / GiB:.1f} GiB; {advice}"
    )


SKIP_ENV = "LAD_FAST_SKIP_PLAN"


def check_device(cfg: LadConfig, model: str, tcfg: TrainConfig, device: torch.device) -> StepPlan | None:
    """The check ``lad-fast train`` makes before any work (``cli/train_cmds.py``): on a CUDA device,
    :func:`check_fits` against the device's memory (the batch is per process: under torchrun each rank
    holds its own). Nothing on other devices, where no plan is made, and nothing when ``LAD_FAST_SKIP_PLAN=1``
    (the plan is a prediction; a user who measured a batch that fits may overrule it)."""
    import os

    if device.type != "cuda" or os.environ.get(SKIP_ENV) == "1":
        return None
    props = torch.cuda.get_device_properties(device)
    return check_fits(cfg, model, tcfg, props.total_memory, props.name)


def _largest_traced(cfg: LadConfig, model: str, tcfg: TrainConfig, plan: StepPlan, gpu: GPU) -> int:
    """The largest batch below ``plan``'s whose traced peak fits: :meth:`StepPlan.largest_batch`'s
    prediction, moved until the traces agree."""

    def fits(b: int) -> bool:
        return plan_step(cfg, model, b, tcfg=tcfg).peak <= gpu.usable

    b = min(plan.largest_batch(gpu), plan.batch - 1)
    while b > 0 and not fits(b):
        b -= 1
    while b + 1 < plan.batch and fits(b + 1):
        b += 1
    return b


# ------------------------------------------------------------------------------------ the report


_GiB = 2**30


def _gib_by(by: Mapping[str, int]) -> dict[str, float]:
    """A breakdown in GiB, largest first, zeros left out."""
    return {k: round(v / _GiB, 3) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v > 0}


def _rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _training_entry(p: StepPlan, gpus: Sequence[GPU]) -> dict[str, Any]:
    """One model's training step in the report: its peak and FLOPs, and per GPU fit, batch and time."""
    return {
        "model": p.model,
        "batch": p.batch,
        "steps": p.steps,
        "parameters": p.parameters,
        "optimizer": p.optimizer,
        "amp": p.amp,
        "compile": p.compile,
        "peak_gib": round(p.peak / _GiB, 3),
        "peak_by_gib": _gib_by(p.peak_by),
        "tflop_per_step": round(p.flops / 1e12, 3),
        "per_gpu": {
            g.name: {
                "fits": p.peak <= g.usable,
                "largest_batch": p.largest_batch(g),
                "step_s": _rounded(p.seconds(g), 4),
                "hours": _rounded(p.hours(g), 2),
            }
            for g in gpus
        },
    }


def _generate_entry(cfg: LadConfig, batch: int | None, gpus: Sequence[GPU]) -> dict[str, Any]:
    """``generate`` in the report: sampling and decode memory, and per GPU the decode and volumes/hour."""
    from lad_fast.generate.plan import example_tile, plan_generation

    gen = plan_generation(cfg, batch)
    s = gen.sampling
    per_gpu = {}
    for g in gpus:
        choice = gen.decode_choice(cfg, g)
        if choice is None:
            decode = "does not fit"
        else:
            decode = "whole" if choice.tile is None else f"tiles of {choice.tile}"
        per_gpu[g.name] = {
            "fits": choice is not None,
            "largest_batch": gen.largest_batch(g),
            "decode": decode,
            "volumes_per_hour": _rounded(gen.volumes_per_hour(g, choice), 0) if choice is not None else None,
        }
    return {
        "sampler": s.sampler,
        "steps": s.steps,
        "guidance": s.guidance,
        "batch": s.batch,
        "unet_batch": s.unet_batch,
        "unet_calls": s.calls,
        "sampling_peak_gib": round(s.peak / _GiB, 3),
        "sampling_peak_by_gib": _gib_by(s.peak_by),
        "tflop_per_batch": round(s.flops / 1e12, 3),
        "decode_whole_gib": round(gen.whole.peak / _GiB, 3),
        "decode_tiled_gib": round(gen.tiled.peak / _GiB, 3),
        "decode_tile": example_tile(cfg),
        "peak_gib": round(gen.peak() / _GiB, 3),
        "per_gpu": per_gpu,
    }


def plan_report(cfg: LadConfig, batch: int | None = None, gpus: Sequence[GPU] = ()) -> dict[str, Any]:
    """Everything ``lad-fast plan`` prints, as JSON-ready data: each model's training step and
    ``generate``, per GPU of ``gpus`` (default: every GPU of :data:`~lad_fast.utils.gpu_specs.GPUS`).
    ``batch`` overrides every training batch and the sampling batch. Bytes are given in GiB."""
    from lad_fast.utils.gpu_specs import BANDWIDTH_EFFICIENCY, FIT_FRACTION, GPUS, MATH_EFFICIENCY

    gpus = list(gpus) or list(GPUS.values())
    return {
        "preset": cfg.preset,
        "label": "predicted",
        "assumptions": {
            "traced": "one eager step on fake tensors, CUDA kernel path (Triton custom ops); torch.compile, "
            "library workspaces and allocator rounding not modelled",
            "fit_fraction": FIT_FRACTION,
            "math_efficiency": MATH_EFFICIENCY,
            "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
            "rate": "peak dense bf16 tensor-core FLOP/s for every matrix and convolution FLOP",
        },
        "gpus": {
            g.name: {
                "memory_gib": round(g.memory / _GiB, 1),
                "bf16_tflops": g.bf16 and g.bf16 / 1e12,
                "bandwidth_tbs": g.bandwidth and g.bandwidth / 1e12,
            }
            for g in gpus
        },  # fmt: skip
        "training": [_training_entry(p, gpus) for p in plan_training(cfg, batch)],
        "generate": _generate_entry(cfg, batch, gpus),
    }
