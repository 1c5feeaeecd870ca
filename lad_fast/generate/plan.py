"""What generation costs on a GPU, before any run: the sampling batch, the decode, and the decode choice.

Planned by tracing on fake tensors (:mod:`lad_fast.utils.fake_trace`: nothing is allocated and no
kernel runs) on the code path a CUDA install takes (:func:`gpu_kernel_path`: lad-fast's Triton custom
ops, whose fake implementations give their outputs' shapes):

- **sampling**: one denoiser call of a batch (classifier-free guidance runs the conditional and the null
  branch as one batch, so the U-Net sees twice the batch unless the scale is 0 or 1) beside the
  sampler's own state, traced by running the sampler with a stand-in denoiser; the call's cost times the
  sampler's number of calls is the batch's;
- **decode**: one volume at a time (as :meth:`lad_fast.generate.generator.Generator.decode` does),
  whole, or tiled with the exact overlap (:mod:`lad_fast.generate.tiled`): tiles run one at a time, the
  others waiting on the host, so the largest tile is traced alone;
- :func:`choose_decode`: whole when the whole decode's planned peak fits the memory left beside
  sampling, else the largest tile that fits; ``generate`` calls it once per run instead of probing free
  memory volume by volume.

This module also holds what training plans share (:mod:`lad_fast.train.plan` sits above it): the kernel
path, building modules without allocating, and the largest-batch search.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch import nn

import lad_fast.kernels._dispatch as _dispatch
from lad_fast.errors import ConfigError
from lad_fast.utils.fake_trace import TensorTracker, fake_mode
from lad_fast.utils.gpu_specs import GPU, roofline_seconds

if TYPE_CHECKING:
    from lad_fast.config import LadConfig

# Custom ops a traced CUDA step goes through (tests check that a plan's trace really took that path).
GPU_OPS = ("lad_fast::conv3d", "lad_fast::norm_act_conv3d", "lad_fast::attention_fwd", "lad_fast::vq_nearest")


# ------------------------------------------------------------------------------------ tracing


@contextlib.contextmanager
def gpu_kernel_path() -> Iterator[None]:
    """Inside the block lad-fast's kernels choose as they do for CUDA tensors with Triton installed,
    whatever the tensors' device: ``impl="auto"`` resolves to the Triton custom ops (their fake
    implementations run on fake tensors; the Triton code is never imported), and arguments a kernel
    cannot serve fall back to the reference as on a GPU. ``LAD_FAST_KERNELS=torch`` still forces the
    references. The CPU's batch-1 oneDNN detour (``kernels/_cpu_conv.py``) is off, as on a GPU."""
    real = _dispatch.resolve_impl

    def as_on_gpu(impl: str, *tensors: torch.Tensor) -> str:
        real(impl)  # the same checks of impl and LAD_FAST_KERNELS (no tensors: no device rule)
        forced = os.environ.get("LAD_FAST_KERNELS", "")
        chosen = forced if impl == "auto" and forced else impl
        return "torch" if chosen == "torch" else "triton"

    with (
        _patched("resolve_impl", real, as_on_gpu),
        mock.patch.dict(os.environ, {"LAD_FAST_ONEDNN_BATCH1": "0"}),
    ):
        yield


@contextlib.contextmanager
def _patched(name: str, real: Any, replacement: Any) -> Iterator[None]:
    """``name`` replaced by ``replacement`` in every lad-fast module that imported ``real`` under it."""
    importlib.import_module("lad_fast.kernels")  # every kernel module is loaded, so each is patched
    users = [
        m for n, m in list(sys.modules.items()) if n.startswith("lad_fast") and getattr(m, name, None) is real
    ]
    with contextlib.ExitStack() as stack:
        for module in users:
            stack.enter_context(mock.patch.object(module, name, replacement))
        yield


@contextlib.contextmanager
def tracing(gpu: bool = True) -> Iterator[None]:
    """Fake tensors for the block, on the CUDA kernel path (:func:`gpu_kernel_path`) when ``gpu``, else
    on the CPU's (the references)."""
    with fake_mode(), gpu_kernel_path() if gpu else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device, outside fake mode: their init arithmetic is then free;
    :func:`fake_module` gives them fake tensors after."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("meta"):
        yield


def fake_module(module: nn.Module, swapped: dict[int, torch.Tensor] | None = None) -> nn.Module:
    """``module`` (built on the meta device) with every parameter and buffer replaced by an empty tensor
    (fake, inside :func:`tracing`) of the same shape, dtype and ``requires_grad``. ``swapped`` collects
    ``id(old) -> new`` for optimisers built over the old parameters."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type == "meta":
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                m._parameters[name] = new
                if swapped is not None:
                    swapped[id(p)] = new
        for name, b in list(m._buffers.items()):
            if b is not None and b.device.type == "meta":
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return module


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


# --------------------------------------------------------------------------------- the models


def _build(cfg: LadConfig) -> tuple[nn.Module, Any, tuple[int, ...], int]:
    """(U-Net, VQ-GAN, one latent's (C, d, h, w), structure length): ``cfg``'s models in eval mode, with
    fake weights (inside :func:`tracing`)."""
    from lad_fast.conditioning.conditions import structure_dim
    from lad_fast.models.unet import build_unet
    from lad_fast.models.vqgan import VQGAN

    f = 2 ** (len(cfg.vqgan.channels) - 1)
    latent = (cfg.vqgan.code_dim, *(s // f for s in cfg.geometry.shape))
    struct = structure_dim(cfg.geometry.shape[0], cfg.condition)
    with on_meta():
        net = build_unet(cfg.unet, cfg.condition, latent[0], struct)
        vq = VQGAN(cfg.vqgan)
    return fake_module(net).eval(), fake_module(vq).eval(), latent, struct


# --------------------------------------------------------------------------------- sampling


# Categories of sampling memory that grow with the batch (the weights do not).
SAMPLING_PER_SAMPLE = ("conditions and sampler state", "activations")


@dataclass(frozen=True)
class SamplingPlan:
    """One sampling batch of ``batch`` volumes with ``cfg.sampling``'s sampler, steps and guidance:
    ``unet_batch`` rows per U-Net call (guidance doubles them), ``calls`` U-Net calls per batch.

    peak: bytes of the U-Net's weights, the conditions and the sampler's state, and one call's
    activations (``peak_by``); weights: the U-Net's; flops: of the whole batch; call_costs: per op of
    one call; other_costs: the sampler's own arithmetic over the batch.
    """

    sampler: str
    steps: int
    guidance: float
    batch: int
    unet_batch: int
    calls: int
    peak: int
    peak_by: dict[str, int]
    weights: int
    flops: int
    call_costs: list[tuple[int, int]] = field(repr=False)
    other_costs: list[tuple[int, int]] = field(repr=False)

    def peak_at(self, batch: int) -> int:
        """Predicted peak at another batch (the per-sample categories scaled, the weights kept)."""
        scale = batch / self.batch
        return int(sum(v * (scale if k in SAMPLING_PER_SAMPLE else 1.0) for k, v in self.peak_by.items()))

    def seconds(self, gpu: GPU) -> float | None:
        """Predicted time of the batch: every U-Net call and the sampler's arithmetic."""
        call = roofline_seconds(self.call_costs, gpu)
        return None if call is None else self.calls * call + roofline_seconds(self.other_costs, gpu)


def plan_sampling(cfg: LadConfig, batch: int, gpu: bool = True) -> SamplingPlan:
    """Trace one sampling batch of ``cfg``'s model with its recorded sampler, steps and guidance
    (``cfg.sampling``, what ``lad-fast generate`` uses when not told otherwise)."""
    from lad_fast.conditioning.conditions import null_spatial
    from lad_fast.diffusion.samplers import SAMPLERS, guided_denoiser, sample
    from lad_fast.diffusion.schedules import make_schedule

    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    s = cfg.sampling
    with tracing(gpu), torch.no_grad():
        net, _, latent, struct = _build(cfg)
        sched = make_schedule(cfg.diffusion)
        content = torch.zeros(batch, *latent)
        structure = torch.zeros(batch, struct)
        emb = net.embed_condition(content, structure)
        cond, null = [emb], [net.null_condition(batch).to(emb.dtype)]
        if net.spatial_channels:
            spatial = torch.zeros(batch, net.spatial_channels, *latent[1:])
            cond, null = [emb, spatial], [null[0], null_spatial(spatial)]
        den = guided_denoiser(net, cond, null, s.guidance)
        x = torch.zeros(batch, *latent)
        t = torch.zeros(batch, dtype=torch.float32 if sched.objective == "flow" else torch.long)

        # the sampler with a stand-in denoiser: its state, its own arithmetic and how often it calls
        calls = 0

        def stand_in(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return torch.zeros_like(xt)

        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        # a sampler without a steps parameter (ancestral DDPM) walks every timestep
        kwargs = {"steps": s.steps} if "steps" in inspect.signature(SAMPLERS[s.sampler]).parameters else {}
        around = TensorTracker()
        with around:
            sample(s.sampler, stand_in, sched, latent, gens, prediction=cfg.diffusion.prediction, **kwargs)
        one = TensorTracker()
        one.track(weights(net), "weights")
        one.track([x, t, *cond, *null], "conditions and sampler state")
        with one, one.category("activations"):
            den(x, t)
    by = dict(one.trace.peak_by)
    # the call's activations come on top of the sampler's own state (beyond the x and t counted)
    state = max(0, around.trace.peak - x.numel() * x.element_size())
    by["conditions and sampler state"] = by.get("conditions and sampler state", 0) + state
    return SamplingPlan(
        sampler=s.sampler,
        steps=kwargs.get("steps", calls),
        guidance=s.guidance,
        batch=batch,
        unet_batch=batch if s.guidance in (0.0, 1.0) else 2 * batch,
        calls=calls,
        peak=one.trace.peak + state,
        peak_by=by,
        weights=by.get("weights", 0),
        flops=one.trace.flops * calls + around.trace.flops,
        call_costs=one.trace.costs,
        other_costs=around.trace.costs,
    )


# --------------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class DecodePlan:
    """The decode of one volume: tile None (whole) or N latent voxels per axis. peak: bytes on the GPU
    with the VQ-GAN's ``weights``; ``peak - weights`` is the decode's working memory; costs per op."""

    tile: int | None
    peak: int
    weights: int
    flops: int
    costs: list[tuple[int, int]] = field(repr=False)

    @property
    def working(self) -> int:
        return self.peak - self.weights

    def seconds(self, gpu: GPU) -> float | None:
        return roofline_seconds(self.costs, gpu)


def _tiles(latent: Sequence[int], tile: int, overlap: int) -> tuple[list[int], float]:
    """(the largest tile's latent box, the sum of every tile's box volume over that box's volume)."""
    boxes, total = [], 1.0
    for n in latent[1:]:
        cores = [(a, min(a + tile, n)) for a in range(0, n, tile)]
        sizes = [min(n, b + overlap) - max(0, a - overlap) for a, b in cores]
        boxes.append(max(sizes))
        total *= sum(sizes) / max(sizes)
    return boxes, total


def _decode_plan(vq: Any, latent: Sequence[int], tile: int | None) -> DecodePlan:
    """Whole: the decode of one latent. Tiled: the quantisation of the latent, then the largest tile's
    program alone (tiles run one at a time, the others waiting on the host), its output and blend
    buffers counted as GPU memory (an upper bound); its costs scaled by the tiles' total volume."""
    from lad_fast.generate.tiled import exact_overlap, tiled_decode

    tracker = TensorTracker()
    tracker.track(weights(vq), "weights")
    with tracker, tracker.category("activations"):
        z = vq.quantize(vq.from_unit(torch.zeros(1, *latent)))
        scale = 1.0
        if tile is None:
            vq.decode(z)
        else:
            box, scale = _tiles(latent, tile, exact_overlap(vq.decoder))
            one = torch.zeros(1, latent[0], *box)
            tiled_decode(vq.decoder, one, max(box), store=one.device)  # one tile: the whole box
    trace = tracker.trace
    costs = trace.costs if scale == 1.0 else [(int(f * scale), int(b * scale)) for f, b in trace.costs]
    w = trace.peak_by.get("weights", 0)
    return DecodePlan(tile, trace.peak, w, int(trace.flops * scale), costs)


def plan_decode(cfg: LadConfig, tile: int | None = None, gpu: bool = True) -> DecodePlan:
    """Trace the decode of one volume of ``cfg``, whole (``tile`` None) or in tiles of ``tile``."""
    with tracing(gpu), torch.no_grad():
        _, vq, latent, _ = _build(cfg)
        return _decode_plan(vq, latent, tile)


def example_tile(cfg: LadConfig) -> int:
    """The tile a plan shows beside the whole decode: an eighth of the largest latent axis. (Large tiles
    can need more memory than the whole decode: the tiled program normalises outside the fused kernels,
    with float64 statistics.)"""
    f = 2 ** (len(cfg.vqgan.channels) - 1)
    return max(1, max(cfg.geometry.shape) // f // 8)


def choose_decode(cfg: LadConfig, budget: int, gpu: bool = True) -> DecodePlan:
    """How ``generate`` decodes on a GPU with ``budget`` bytes left for the decode's working memory (the
    VQ-GAN's weights are loaded already): whole when its planned working memory fits, else in the largest
    tile that fits; tiles of 1 latent voxel when none does (the least memory there is).

    Raises ConfigError when ``budget`` is not positive (sampling leaves nothing for decoding).
    """
    if budget <= 0:
        raise ConfigError(
            f"no GPU memory is left for decoding beside sampling ({budget / 2**20:.0f} MiB); lower --batch"
        )
    with tracing(gpu), torch.no_grad():
        _, vq, latent, _ = _build(cfg)
        whole = _decode_plan(vq, latent, None)
        if whole.working <= budget:
            return whole
        plans: dict[int, DecodePlan] = {}

        def fits(tile: int) -> bool:
            plans[tile] = _decode_plan(vq, latent, tile)
            return plans[tile].working <= budget

        lo, hi = 1, max(latent[1:]) - 1  # the largest tile that fits, by bisection (memory grows with it)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return plans[lo] if lo in plans else _decode_plan(vq, latent, lo)


def decode_budget(device: torch.device, sampling: SamplingPlan) -> int:
    """Bytes a decode may use on ``device`` beside sampling batches of the ``sampling`` plan: the free
    CUDA memory (read once, after the models are loaded) less the sampling batch's working memory and
    the share of the GPU a plan keeps free (:data:`lad_fast.utils.gpu_specs.FIT_FRACTION`)."""
    from lad_fast.utils.gpu_specs import FIT_FRACTION

    free, total = torch.cuda.mem_get_info(device)
    return int(free - (1 - FIT_FRACTION) * total) - (sampling.peak - sampling.weights)


def planned_tile(cfg: LadConfig, device: torch.device, batch: int) -> int | None:
    """How ``lad-fast generate`` decodes on a CUDA ``device`` beside sampling batches of ``batch``: 0
    (whole) or the tile :func:`choose_decode` picks from the traced plan and the free memory
    (:func:`decode_budget`), decided once per call. None when ``LAD_FAST_DECODE_BUDGET_MB`` sets the
    budget by hand: :meth:`lad_fast.generate.generator.Generator.decode` then applies it per volume.
    Raises ConfigError when sampling leaves no memory for decoding."""
    from lad_fast.generate.tiled import BUDGET_ENV

    if os.environ.get(BUDGET_ENV, "").strip():
        return None
    chosen = choose_decode(cfg, decode_budget(device, plan_sampling(cfg, batch)))
    return 0 if chosen.tile is None else chosen.tile


# --------------------------------------------------------------------------------- the whole plan


@dataclass(frozen=True)
class GenerationPlan:
    """``lad-fast generate`` with ``cfg``'s model: a sampling batch, the whole decode and a tiled one
    (:func:`example_tile`). Sampling of batch k + 1 overlaps decoding of batch k on the GPU, so both
    working memories are resident at once, beside both models' weights."""

    sampling: SamplingPlan
    whole: DecodePlan
    tiled: DecodePlan

    def peak(self, decode: DecodePlan | None = None, batch: int | None = None) -> int:
        """Predicted GPU peak: both models' weights, sampling at ``batch`` and ``decode`` (whole)."""
        d = decode or self.whole
        return self.sampling.peak_at(batch or self.sampling.batch) + d.peak

    def largest_batch(self, gpu: GPU) -> int:
        """The largest sampling batch that fits ``gpu`` beside the whole decode (0: none does)."""
        return largest_fitting(lambda b: self.peak(batch=b), gpu.usable, self.sampling.batch)

    def decode_choice(self, cfg: LadConfig, gpu: GPU) -> DecodePlan | None:
        """The decode :func:`choose_decode` picks on ``gpu`` beside this sampling batch (None: not even
        the smallest tiles fit)."""
        budget = gpu.usable - self.sampling.peak - self.whole.weights
        if budget <= 0:
            return None
        if self.whole.working <= budget:
            return self.whole
        plan = choose_decode(cfg, budget)
        return plan if plan.working <= budget else None

    def volumes_per_hour(self, gpu: GPU, decode: DecodePlan | None = None) -> float | None:
        """Predicted volumes per hour: a batch's sampling and its volumes' decodes, one after the other
        on the GPU (the overlap hides the host's work, not the GPU's)."""
        t = self.sampling.seconds(gpu)
        d = (decode or self.whole).seconds(gpu)
        if t is None or d is None:
            return None
        return 3600.0 * self.sampling.batch / (t + self.sampling.batch * d)


def plan_generation(cfg: LadConfig, batch: int | None = None, gpu: bool = True) -> GenerationPlan:
    """Plan ``lad-fast generate`` with ``cfg`` at ``batch`` (default: its default ``--batch``)."""
    from lad_fast.config import GENERATE_BATCH

    b = GENERATE_BATCH if batch is None else batch
    return GenerationPlan(
        plan_sampling(cfg, b, gpu), plan_decode(cfg, None, gpu), plan_decode(cfg, example_tile(cfg), gpu)
    )


def largest_fitting(peak_at: Callable[[int], int], budget: int, start: int) -> int:
    """The largest batch b with ``peak_at(b) <= budget`` (0 when batch 1 does not fit), for a peak that
    grows with the batch: extrapolated from ``start`` and ``start + 1`` (the peak is about affine in the
    batch), then moved until ``peak_at`` agrees."""
    p0, p1 = peak_at(start), peak_at(start + 1)
    per = max(p1 - p0, 1)
    b = max(0, math.floor(start + (budget - p0) / per))
    while b > 0 and peak_at(b) > budget:
        b -= 1
    while peak_at(b + 1) <= budget:
        b += 1
    return b
