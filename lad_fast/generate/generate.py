"""``lad-fast generate``: large synthetic datasets from a trained run (Lad's third phase, ``docs/lad.md``).

Volume ``i`` of ``n`` is conditioned on an augmented source mask (:mod:`lad_fast.generate.jobs`), its latent
is sampled with classifier-free guidance from the generator of ``volume_seed(seed, i)``, quantised and
decoded by the VQ-GAN. Conditions and decoding run one volume at a time and sampling noise comes from
one generator per volume, so a volume does not depend on the batch it was drawn in (the batched U-Net
forward is the only thing that sees the batch).

:func:`generate` reads as its steps:

1. load: :func:`_check_args` refuses bad options before the run is opened; the run is opened once and
   :func:`lad_fast.generate.generator.load_generator` loads it in one pass; :func:`resolve_sampling` turns
   the options and the run's ``sampling`` defaults into one checked :class:`SamplerSettings`;
2. plan: :func:`make_plan` fixes what this call makes (the volumes not yet in ``out``, the source masks, the
   manifest entries), with :class:`lad_fast.generate.writer.VolumeWriter` owning the output folder
   (atomic writes, manifest, resume, rank shards, ``dataset.json``);
3. sample and write: :func:`_sample_batch` draws each batch's jobs (:func:`lad_fast.generate.jobs.draw_job`)
   and samples their latents (:func:`sample_latents`, pure: no files) while a worker thread decodes
   (:meth:`Generator.decode`) and writes the previous batch (:func:`_sample_and_write`);
4. finish: :func:`_finish` reports an interrupted call or merges the shards and writes ``dataset.json``.

Under ``torchrun`` rank r makes the ids ``i % world == r``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lad_fast.config import GENERATE_BATCH
from lad_fast.errors import CheckpointError, ConfigError, InputError
from lad_fast.generate.generator import Generator, load_generator
from lad_fast.generate.jobs import (
    Job,
    SourceMask,
    augment_seed,
    augmented_mask,
    derive_seed,
    draw_job,
    load_source_masks,
    volume_seed,
)
from lad_fast.generate.writer import MANIFEST, VolumeWriter, read_manifest, volume_id
from lad_fast.utils.background import Background
from lad_fast.utils.interrupts import Interrupted, StopFlag, deferred
from lad_fast.utils.lock import locks_folder

if TYPE_CHECKING:
    from lad_fast.config import SamplingConfig
    from lad_fast.diffusion.schedules import Schedule
    from lad_fast.models.unet import LatentUNet
    from lad_fast.utils.distributed import DistInfo

# The generation API in one import: the parts live in jobs, generator and writer.
__all__ = [
    "MANIFEST",
    "Generator",
    "Job",
    "Plan",
    "SamplerSettings",
    "SourceMask",
    "augment_seed",
    "augmented_mask",
    "derive_seed",
    "draw_job",
    "generate",
    "load_generator",
    "load_source_masks",
    "make_plan",
    "read_manifest",
    "resolve_sampling",
    "sample_latents",
    "sampler_options",
    "volume_id",
    "volume_seed",
]


# ------------------------------------------------------------------------------------- sampling


def sampler_options(name: str) -> frozenset[str]:
    """Which of ``steps`` and ``eta`` sampler ``name`` reads: those it names as parameters (the samplers
    swallow the others through ``**_``). A sampler without ``steps`` walks all T timesteps."""
    from lad_fast.diffusion.samplers import SAMPLERS

    return frozenset(inspect.signature(SAMPLERS[name]).parameters) & {"steps", "eta"}


@dataclass(frozen=True)
class SamplerSettings:
    """How every latent of one generate call is sampled: sampler name, steps, classifier-free guidance
    scale, and eta (None unless the sampler reads it). :func:`resolve_sampling` makes the checked one."""

    sampler: str
    steps: int
    guidance: float
    eta: float | None = None


def sample_latents(
    net: LatentUNet,
    denoise: Callable[..., torch.Tensor],
    content: torch.Tensor,
    structure: torch.Tensor,
    seeds: Sequence[int],
    settings: SamplerSettings,
    *,
    spatial: torch.Tensor | None = None,
    sched: Schedule,
    prediction: str,
    shape: Sequence[int],
    clip: Any = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Sample latents for one batch; pure (no files, no VQ-GAN).

    net: the U-Net whose ``embed_condition`` and ``null_condition`` build the guidance conditions;
    denoise: ``net``'s forward ``(x, t, cond)`` on some backend; content (B, C, d, h, w), structure (B, L):
    per-volume conditions; spatial (B, K, d, h, w): the spatial conditions, required when ``net`` has
    ``spatial_channels`` (the conditional branch gets them, the null branch zeros) and refused otherwise;
    seeds: B noise seeds (one ``torch.Generator`` each); shape: one latent's (C, d, h, w). Returns x0
    (B, *shape) in the sampler's latent space. Conditions are embedded one sample at a time, noise is
    per sample and, on a CPU, the denoiser runs one row at a time, so a volume does not depend on its
    batch bit for bit; on a GPU the denoiser runs batched (throughput), where batched kernels may round
    differently per batch size.
    """
    from lad_fast.conditioning.conditions import null_spatial
    from lad_fast.diffusion.samplers import guided_denoiser, one_row_at_a_time, sample

    if bool(getattr(net, "spatial_channels", 0)) != (spatial is not None):
        raise ConfigError(
            "sample_latents: this model takes a spatial condition; pass spatial=(B, K, d, h, w)"
            if spatial is None
            else "sample_latents: this model has no spatial input (condition.spatial='none'); drop spatial"
        )

    options = sampler_options(settings.sampler)
    kwargs: dict[str, Any] = {
        k: v for k, v in (("steps", settings.steps), ("eta", settings.eta)) if k in options and v is not None
    }
    with torch.no_grad():
        content, structure = content.to(device), structure.to(device)
        # one sample at a time: the embedding must not depend on the batch either
        emb = torch.cat(
            [net.embed_condition(content[k : k + 1], structure[k : k + 1]) for k in range(len(seeds))]
        )
        null = net.null_condition(len(seeds)).to(emb.dtype)
        cond, nulls = [emb], [null]
        if spatial is not None:
            spatial = spatial.to(device=device, dtype=emb.dtype)
            cond, nulls = [emb, spatial], [null, null_spatial(spatial)]
        if torch.device(device).type == "cpu":
            # bit-for-bit batch invariance: batched CPU kernels round differently per batch size
            denoise = one_row_at_a_time(denoise)
        den = guided_denoiser(denoise, cond, nulls, settings.guidance)
        # noise on the sampling device, one generator per sample (on CUDA, Philox streams per seed: still
        # independent of the batch)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return sample(
            settings.sampler,
            den,
            sched,
            tuple(shape),
            gens,
            prediction=prediction,
            device=device,
            clip=clip,
            **kwargs,
        )


# ------------------------------------------------------------------------------------- options

MAX_VOLUMES = 1_000_000  # --n cap: a rank's to-do list stays tens of MB, the manifest some hundred MB


def _check_finite(flag: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{flag} must be a finite number, got {value}")


def _check_guidance(guidance: float) -> None:
    _check_finite("--guidance", guidance)
    if guidance < 0:
        raise ConfigError(f"--guidance must be >= 0 (0: unconditional, 1: conditional), got {guidance}")


def _check_sampler(sampler: str, steps: int | None, eta: float | None) -> None:
    """Refuse an unknown sampler, and ``steps`` or ``eta`` given to a sampler that does not read them
    (they would be ignored without a word)."""
    from lad_fast.diffusion.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if eta is not None and "eta" not in sampler_options(sampler):
        takes = [s for s in SAMPLERS if "eta" in sampler_options(s)]
        raise ConfigError(
            f"--eta has no effect on the {sampler} sampler; drop --eta, or use --sampler {' or '.join(takes)}"
        )
    if steps is not None and "steps" not in sampler_options(sampler):
        takes = [s for s in SAMPLERS if "steps" in sampler_options(s)]
        raise ConfigError(
            f"--steps has no effect on the {sampler} sampler (it walks all T timesteps); drop --steps, "
            f"or use --sampler {', '.join(takes)} (whichever fits the model's objective)"
        )


def _check_args(
    n: int,
    sampler: str | None,
    guidance: float | None,
    augment: int,
    batch: int,
    backend: str,
    eta: float | None,
    steps: int | None = None,
    decode_tile: int | None = None,
) -> None:
    """Refuse bad options before the run is opened; ``None`` (not given: the run's default, checked by
    :func:`resolve_sampling`) passes."""
    from lad_fast.export.backends import BACKENDS

    _check_finite("--guidance", guidance)
    _check_finite("--eta", eta)
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if n > MAX_VOLUMES:
        raise ConfigError(
            f"--n {n} is more than one generate call makes ({MAX_VOLUMES:,} volumes, terabytes at the lad "
            "preset); generate in parts with different --seed into different --out folders"
        )
    if guidance is not None:
        _check_guidance(guidance)
    if augment < 0:
        raise ConfigError(f"--augment must be >= 0 (0: the source masks as they are), got {augment}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if sampler is not None:
        _check_sampler(sampler, steps, eta)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            from lad_fast.errors import BackendUnavailableError
            from lad_fast.export.tensorrt import _INSTALL_HINT

            raise BackendUnavailableError(f"--backend trt: {_INSTALL_HINT}") from None
    if decode_tile is not None and decode_tile < 0:
        raise ConfigError(f"--decode-tile must be >= 0 (0: never tile), got {decode_tile}")


def resolve_sampling(
    defaults: SamplingConfig,
    objective: str,
    T: int,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
) -> SamplerSettings:
    """The settings every latent of this call is sampled with: the given options over the run's
    ``defaults`` (its ``sampling`` config), checked against the model (trained with ``objective``, ``T``
    timesteps). Options given were checked by :func:`_check_args`; a default is checked here, since the
    run's own sampler may not read the given ``steps`` or ``eta``. A sampler without ``steps`` walks all
    ``T``; ``eta`` of a sampler that reads it defaults to 0 (deterministic)."""
    from lad_fast.diffusion.samplers import check_sampler

    if sampler is None:
        sampler = defaults.sampler
        _check_sampler(sampler, steps, eta)
    if guidance is None:
        guidance = defaults.guidance
        _check_guidance(guidance)
    check_sampler(sampler, objective)  # a sampler that fits the model's objective
    options = sampler_options(sampler)
    if "steps" not in options:
        steps = T  # a sampler without steps (ancestral DDPM) walks every timestep
    else:
        steps = steps if steps is not None else defaults.steps
        if not 1 <= steps <= T:
            raise ConfigError(f"--steps {steps} is outside 1..{T} (the model's T); use at most {T}")
    if "eta" in options and eta is None:
        eta = 0.0
    return SamplerSettings(sampler, steps, float(guidance), None if eta is None else float(eta))


# ------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """What one generate call (one rank under ``torchrun``) makes, fixed before anything is sampled.

    n: volumes in the whole set; todo: the ids of those this rank still makes (the others are complete
    in ``out`` or another rank's); sources: the masks conditions are drawn from; seed, augment: what
    :func:`~lad_fast.generate.jobs.draw_job` draws volume i with; batch: volumes per sampler call;
    sampling: the resolved settings; decode_tile: see :meth:`Generator.decode`; fields: the manifest
    entries every volume shares (settings, checkpoints, backend, run).
    """

    n: int
    todo: list[int]
    sources: list[SourceMask]
    seed: int
    augment: int
    batch: int
    sampling: SamplerSettings
    decode_tile: int | None
    fields: dict[str, Any]


def _source_masks(gen: Generator, masks: Path | None) -> tuple[Path, list[SourceMask]]:
    """(folder, masks) to condition on: ``masks``, else the data the diffusion model trained on."""
    given = masks if masks is not None else gen.meta.get("data")
    source = Path(given) if given else None
    if source is None or not source.exists():
        raise InputError(
            f"{source or 'the run'}: the masks to condition on are not there; pass --masks PREPARED|DIR"
        )
    return source, load_source_masks(source, gen.cfg.preset, gen.cfg.geometry.shape)


def make_plan(
    gen: Generator,
    run: Path,
    out: Path,
    sampling: SamplerSettings,
    info: DistInfo,
    *,
    n: int,
    masks: Path | None,
    augment: int,
    batch: int,
    seed: int,
    backend: str,
    force: bool,
    decode_tile: int | None,
    layout: str = "default",
) -> tuple[Plan, VolumeWriter]:
    """The :class:`Plan` of this call and the writer that owns ``out`` (prepared by rank 0: an ``out``
    made with other settings is refused unless ``force``); raises before anything is written when the
    masks are missing or the backend's artefact does not fit."""
    from lad_fast.export.backends import preflight

    source, sources = _source_masks(gen, masks)
    settings = {  # what the writer checks a rerun against
        "base_seed": seed,
        "sampler": sampling.sampler,
        "steps": sampling.steps,
        "eta": sampling.eta,
        "guidance": sampling.guidance,
        "augment": augment,
        "source_dataset": str(source.resolve()),
        "diffusion_checkpoint": gen.meta["checkpoint_hash"],
    }
    preflight(backend, run, batch)  # a stale artefact or a batch outside an engine's profile: refused here
    writer = VolumeWriter(
        out, settings, rank=info.rank, world=info.world, sharded=info.enabled, layout=layout
    )
    if info.is_main:
        writer.prepare(force)
    if info.enabled:
        torch.distributed.barrier()
    fields = {**settings, "backend": backend, "vqgan_checkpoint": gen.vqgan_hash, "run": str(run.resolve())}
    todo = writer.todo(n)
    return Plan(n, todo, sources, seed, augment, batch, sampling, decode_tile, fields), writer


# ------------------------------------------------------------------------------------- sample and write


def _backends(
    gen: Generator, backend: str, run: Path, batch: int
) -> tuple[Callable[..., torch.Tensor], Callable[..., Any] | None]:
    """(denoiser step, exported decoder or None) of ``backend`` (:mod:`lad_fast.export.backends`): onnx and
    trt load or export the run's artefacts; the decoder artefact serves whole-volume decodes only."""
    from lad_fast.export.backends import make_decoder, make_denoiser

    dev, shape = gen.device, gen.latent_shape
    t_dtype = torch.float32 if gen.sched.objective == "flow" else torch.long  # flow time is continuous
    example = [torch.zeros(1, *shape, device=dev), torch.zeros(1, dtype=t_dtype, device=dev),
               torch.zeros(1, gen.net.cond_cfg.embed_dim, device=dev)]  # fmt: skip
    names = ["x", "t", "cond"]
    spatial_ch = getattr(gen.net, "spatial_channels", 0)
    if spatial_ch:  # spatial conditioning: the per-step graph has a fourth input
        example.append(torch.zeros(1, spatial_ch, *shape[1:], device=dev))
        names.append("spatial")
    denoise = make_denoiser(backend, gen.net, example, names, run / "export", run=run, batch=batch)
    # decoding runs one volume at a time: the decoder's artefact at batch 1
    exported = make_decoder(backend, gen.vq, run, batch=1) if backend in ("onnx", "trt") else None
    return denoise, exported


def _sample_batch(
    gen: Generator, plan: Plan, ids: Sequence[int], denoise: Callable[..., torch.Tensor]
) -> tuple[list[Job], list[int], torch.Tensor]:
    """Volumes ``ids``: their jobs, noise seeds and sampled latents (B, C, d, h, w) in sampler space."""
    jobs = [draw_job(i, plan.sources, plan.seed, plan.augment, gen.cfg, gen.encode) for i in ids]
    seeds = [volume_seed(plan.seed, j.index) for j in jobs]
    spatial = getattr(gen.net, "spatial_channels", 0)
    x0 = sample_latents(
        gen.net,
        denoise,
        torch.stack([j.content for j in jobs]),
        torch.stack([j.structure for j in jobs]),
        seeds,
        plan.sampling,
        spatial=torch.stack([j.spatial for j in jobs]) if spatial else None,
        sched=gen.sched,
        prediction=gen.prediction,
        shape=gen.latent_shape,
        clip=gen.clip,
        device=gen.device,
    )
    return jobs, seeds, x0


def _decoded(
    gen: Generator, plan: Plan, job: Job, x: torch.Tensor, finite: bool, exported: Any
) -> np.ndarray:
    """Volume ``job``'s image (D, H, W) in [-1, 1] from its latent ``x`` (1, C, d, h, w); CheckpointError
    when the latent or the image is not finite (NaN/Inf must never become a volume)."""
    image = gen.decode(x, plan.decode_tile, exported)[0] if finite else None
    if image is None or not np.isfinite(image).all():
        s = plan.sampling
        raise CheckpointError(
            f"volume {volume_id(job.index)}: the sampled latents are not finite (NaN/Inf) with "
            f"sampler {s.sampler}, {s.steps} steps, guidance {s.guidance}, eta {s.eta}; "
            "nothing written for it; check the run's diffusion checkpoint or lower --guidance"
        )
    return image


def _sample_and_write(
    gen: Generator,
    plan: Plan,
    writer: VolumeWriter,
    denoise: Callable[..., torch.Tensor],
    exported: Callable[..., Any] | None,
    show_progress: bool,
) -> tuple[int, StopFlag]:
    """Sample the plan's batches while a worker thread decodes, converts to HU and writes the previous one
    (:mod:`lad_fast.utils.background`, one batch queued at most); returns (volumes written, stop flag).

    SIGINT / SIGTERM: the volume being written is finished, the rest of its batch dropped (nothing partial
    is ever written) and the stop flag set; the rerun makes what is missing.
    """
    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.utils.progress import make_progress

    window = gen.cfg.geometry.hu_window
    t0 = time.perf_counter()
    made = 0
    with deferred("after the volume being written") as stop, make_progress() as progress:
        task = progress.add_task("generate", total=len(plan.todo), status="") if show_progress else None

        def finish(item: tuple[list[Job], list[int], torch.Tensor]) -> None:
            """Worker thread: decode, check, convert to HU and write one sampled batch."""
            nonlocal made
            jobs, seeds, x0 = item
            if gen.device.type == "cuda":  # a new thread starts on cuda:0; Triton launches on the current one
                torch.cuda.set_device(gen.device)
            finite = torch.isfinite(x0.flatten(1)).all(1).tolist()  # one cheap reduction per batch
            for job, vseed, ok, x in zip(jobs, seeds, finite, x0.split(1), strict=True):
                if worker.cancelled or stop:  # interrupted: the volumes not started yet are not written
                    return
                image = _decoded(gen, plan, job, x, ok, exported)
                line = {"seed": vseed, "source_case": job.source.case, "augmentation": job.augmentation}
                writer.write(job.index, unit_to_hu(image, window), job.mask, job.source.affine,
                             {**line, **plan.fields})  # fmt: skip
                made += 1
                if task is not None:
                    rate = made / max(time.perf_counter() - t0, 1e-9) * 60
                    progress.update(task, completed=made, status=f"{rate:.1f} vol/min")

        with Background(finish, maxsize=1) as worker:
            for start in range(0, len(plan.todo), plan.batch):
                if stop:
                    break
                worker.submit(_sample_batch(gen, plan, plan.todo[start : start + plan.batch], denoise))
    return made, stop


def _finish(plan: Plan, made: int, stop: StopFlag, writer: VolumeWriter, out: Path, info: DistInfo) -> None:
    """Raise :class:`Interrupted` when a signal stopped this call short; else merge the shards and write
    ``dataset.json`` (rank 0, once every rank is done). Under ``torchrun``, torchrun forwards the signal to
    every rank; a signal that came after the last volume stops nothing: the set is complete."""
    if stop and made < len(plan.todo):
        done = plan.n - len(plan.todo) + made
        what = (
            f"rank {info.rank} made {made} of its {len(plan.todo)} volumes"
            if info.enabled
            else f"{done} of {plan.n} volumes done in {out}, the rerun makes the other {plan.n - done}"
        )
        raise Interrupted(stop.signum or 2, f"{what}; no partial file", resume_flag="")
    if info.enabled:
        torch.distributed.barrier()  # every shard is written before rank 0 merges them
    if info.is_main:
        writer.finalize()
    if info.enabled:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------- generate


@locks_folder("out", "generate")  # one writer per --out (rank 0 holds it for the whole torchrun job)
def generate(
    run: Path,
    out: Path,
    n: int,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    masks: Path | None = None,
    augment: int = 4,
    batch: int = GENERATE_BATCH,
    seed: int = 0,
    backend: str = "torch",
    force: bool = False,
    device: str = "auto",
    decode_tile: int | None = None,
    layout: str = "default",
) -> Path:
    """Generate ``n`` volumes with paired masks from the trained ``run`` into ``out``; returns ``out``.

    sampler, steps, guidance: ``None`` takes the run's ``sampling`` config (its preset's default: ``tiny``
    Euler, 30 steps, guidance 3 on its flow-matching model). sampler: "ddpm" (all T steps, a given
    ``steps`` refused; Lad's own sampler, ``docs/lad.md``), "ddim" (``eta`` 0 deterministic, the default, 1
    stochastic) or "dpmpp2m" with ``steps`` <= T; ``eta`` with a sampler that does not read it is refused.
    The deterministic samplers need a well-trained denoiser: at the tiny preset's short budget they drift
    (see docs/results.md). A model trained with objective "flow" takes "euler" or "heun" instead
    (``lad_fast.diffusion.samplers.check_sampler``). guidance: classifier-free guidance scale (0
    unconditional, 1 conditional). masks: a prepared dataset or a folder of NIfTI masks on the preset grid
    (default: the data the diffusion model trained on). augment: augmented variants per source mask (0: the
    masks as they are). batch: volumes per sampler call. backend: "torch", "compile", "onnx" or "trt" (see
    ``lad_fast.export.backends``). decode_tile: see :meth:`Generator.decode` (None: on CUDA whole or
    tiled as the memory plan decides, :func:`lad_fast.generate.plan.planned_tile`; elsewhere tiles only
    above the memory budget). layout: "default" (images/ + masks/) or "nnunet" (also nnU-Net v2's imagesTr/ +
    labelsTr/; see :mod:`lad_fast.generate.writer`).

    Pipelined: decoding, HU conversion and writing of batch k run on a worker thread while batch k+1 is
    sampled; an error there stops generation with its own message, and an interrupt lets the volume being
    written finish (atomic writes) and drops the rest.
    """
    from lad_fast.runs.rundir import RunDir
    from lad_fast.utils.devices import choose_device, resolve_device
    from lad_fast.utils.distributed import init_distributed
    from lad_fast.utils.threads import apply_thread_policy

    run, out = Path(run), Path(out)
    _check_args(n, sampler, guidance, augment, batch, backend, eta, steps, decode_tile)
    apply_thread_policy()  # torch threads from the CPU affinity (lad_fast/utils/threads.py)
    rundir = RunDir.open(run)  # the one opening of the run: its config is parsed once
    dev = resolve_device(choose_device(device))  # cuda:LOCAL_RANK under torchrun, as training
    info = init_distributed(dev)
    gen = load_generator(rundir, dev)
    if decode_tile is None and dev.type == "cuda":  # whole or tiled, from the memory plan
        from lad_fast.generate.plan import planned_tile

        decode_tile = planned_tile(gen.cfg, dev, batch)
    sampling = resolve_sampling(
        gen.cfg.sampling, gen.sched.objective, gen.sched.T, sampler, steps, guidance, eta
    )

    plan, writer = make_plan(
        gen, run, out, sampling, info, n=n, masks=masks, augment=augment, batch=batch, seed=seed,
        backend=backend, force=force, decode_tile=decode_tile, layout=layout,
    )  # fmt: skip
    denoise, exported = _backends(gen, backend, run, batch)
    made, stop = _sample_and_write(gen, plan, writer, denoise, exported, show_progress=info.is_main)
    _finish(plan, made, stop, writer, out, info)
    return out
