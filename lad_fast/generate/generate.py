"""``lad-fast generate``: large synthetic datasets from a trained run (Lad phase 3).

Volume ``i`` of ``n`` is conditioned on an augmented source mask (:mod:`lad_fast.generate.jobs`), its latent
is
sampled with classifier-free guidance from the generator of ``volume_seed(seed, i)``, quantised and
decoded by the VQ-GAN. Conditions and decoding run one volume at a time and sampling noise comes from
one generator per volume, so a volume does not depend on the batch it was drawn in (the batched U-Net
forward is the only thing that sees the batch).

The parts, in the order :func:`generate` calls them: :func:`lad_fast.generate.generator.load_generator` (the
trained run),
:func:`lad_fast.generate.jobs.draw_job` (volume i -> source, augmented mask, conditions),
:func:`sample_latents`
(pure: no files) and :meth:`Generator.decode`, then :class:`lad_fast.generate.writer.VolumeWriter` (the
output folder: atomic writes, manifest, resume, rank shards, ``dataset.json``). Under ``torchrun`` rank
r makes the ids ``i % world == r``.
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
from lad_fast.utils.interrupts import Interrupted, deferred
from lad_fast.utils.lock import locks_folder

if TYPE_CHECKING:
    from lad_fast.diffusion.schedules import Schedule
    from lad_fast.models.unet import LatentUNet

# Re-exported: the names callers used to import from here.
__all__ = [
    "MANIFEST",
    "Generator",
    "Job",
    "SamplerSettings",
    "SourceMask",
    "augment_seed",
    "augmented_mask",
    "derive_seed",
    "draw_job",
    "generate",
    "load_generator",
    "load_source_masks",
    "read_manifest",
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
    """The user's sampling choice: sampler name, steps, classifier-free guidance scale, and eta (None
    unless the sampler reads it)."""

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
    (B, *shape) in the sampler's latent space. Conditions are embedded one sample at a time and noise is
    per sample, so a volume does not depend on its batch.
    """
    from lad_fast.conditioning.conditions import null_spatial
    from lad_fast.diffusion.samplers import guided_denoiser, sample

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
        den = guided_denoiser(denoise, cond, nulls, settings.guidance)
        # noise on the sampling device, one generator per sample (a CPU generator gives the same volumes
        # as before; on CUDA, Philox streams per seed, still independent of the batch)
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


# ------------------------------------------------------------------------------------- generation

MAX_VOLUMES = 1_000_000  # --n cap: a rank's to-do list stays tens of MB, the manifest some hundred MB


def _check_args(
    n: int,
    sampler: str | None,
    guidance: float | None,
    augment: int,
    batch: int,
    backend: str,
    eta: float | None,
    steps: int | None = None,
) -> None:
    """Refuse bad options; ``None`` (not given: the run's default) passes. ``steps`` and ``eta`` are the
    user's own: refused with a sampler that does not read them."""
    from lad_fast.diffusion.samplers import SAMPLERS
    from lad_fast.export.backends import BACKENDS

    for flag, value in (("--guidance", guidance), ("--eta", eta)):
        if value is not None and not math.isfinite(value):  # NaN passes every comparison below
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if n > MAX_VOLUMES:
        raise ConfigError(
            f"--n {n} is more than one generate call makes ({MAX_VOLUMES:,} volumes, terabytes at the lad "
            "preset); generate in parts with different --seed into different --out folders"
        )
    if guidance is not None and guidance < 0:
        raise ConfigError(f"--guidance must be >= 0 (0: unconditional, 1: conditional), got {guidance}")
    if augment < 0:
        raise ConfigError(f"--augment must be >= 0 (0: the source masks as they are), got {augment}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if eta is not None and sampler is not None and "eta" not in sampler_options(sampler):
        takes = [s for s in SAMPLERS if "eta" in sampler_options(s)]
        raise ConfigError(
            f"--eta has no effect on the {sampler} sampler; drop --eta, or use --sampler {' or '.join(takes)}"
        )
    if steps is not None and sampler is not None and "steps" not in sampler_options(sampler):
        takes = [s for s in SAMPLERS if "steps" in sampler_options(s)]
        raise ConfigError(
            f"--steps has no effect on the {sampler} sampler (it walks all T timesteps); drop --steps, "
            f"or use --sampler {', '.join(takes)} (whichever fits the model's objective)"
        )
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            from lad_fast.errors import BackendUnavailableError
            from lad_fast.export.tensorrt import _INSTALL_HINT

            raise BackendUnavailableError(f"--backend trt: {_INSTALL_HINT}") from None


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
    batch: int = 4,
    seed: int = 0,
    backend: str = "torch",
    force: bool = False,
    device: str = "auto",
    decode_tile: int | None = None,
    layout: str = "default",
) -> Path:
    """Generate ``n`` volumes with paired masks from the trained ``run`` into ``out``; returns ``out``.

    sampler, steps, guidance: ``None`` takes the run's ``sampling`` config (its preset's measured best:
    ``tiny`` Euler, 30 steps, guidance 3 on its flow-matching model). sampler: "ddpm" (all T steps,
    a given ``steps`` refused; the official Lad sampler), "ddim"
    (``eta`` 0 deterministic, the default, 1 stochastic) or "dpmpp2m" with ``steps`` <= T; ``eta`` with a
    sampler that does not read it is refused. The deterministic samplers need a well-trained denoiser: at
    the tiny preset's short budget they drift (see README). A model trained with objective "flow" takes
    "euler" or "heun" instead (``lad_fast.diffusion.samplers.check_sampler``). guidance: classifier-free
    guidance scale
    (0 unconditional, 1 conditional). masks: a prepared dataset or a folder of NIfTI masks on the preset
    grid (default: the data the diffusion model trained on). augment: augmented variants per source mask
    (0: the masks as they are). batch: volumes per sampler call. backend: "torch", "compile", "onnx" or
    "trt" (see ``lad_fast.export.backends``). decode_tile: see :meth:`Generator.decode` (None: tiles only
    above the memory budget). layout: "default" (images/ + masks/) or "nnunet" (also nnU-Net v2's
    imagesTr/ + labelsTr/; see :mod:`lad_fast.generate.writer`).

    Pipelined: decoding, HU conversion and writing of batch k run on a worker thread
    (:mod:`lad_fast.utils.background`, one batch queued at most) while batch k+1 is sampled; an error there
    stops generation with its own message, and an interrupt lets the volume being written finish
    (atomic writes) and drops the rest.
    """
    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.diffusion.samplers import check_sampler
    from lad_fast.export.backends import make_decoder, make_denoiser, preflight
    from lad_fast.runs.rundir import RunDir
    from lad_fast.utils.devices import choose_device, resolve_device
    from lad_fast.utils.distributed import init_distributed
    from lad_fast.utils.progress import make_progress
    from lad_fast.utils.threads import apply_thread_policy

    run, out = Path(run), Path(out)
    _check_args(n, sampler, guidance, augment, batch, backend, eta, steps)
    if decode_tile is not None and decode_tile < 0:
        raise ConfigError(f"--decode-tile must be >= 0 (0: never tile), got {decode_tile}")
    apply_thread_policy()  # torch threads from the CPU affinity (lad_fast/utils/threads.py)
    defaults = RunDir.open(run).config().sampling  # what the run's preset measured best
    # the run's own default sampler may not read the user's --steps or --eta: check again once resolved
    _check_args(n, sampler or defaults.sampler, guidance, augment, batch, backend, eta, steps)
    sampler = sampler if sampler is not None else defaults.sampler
    steps = steps if steps is not None else defaults.steps
    guidance = guidance if guidance is not None else defaults.guidance
    _check_args(n, sampler, guidance, augment, batch, backend, eta)
    dev = resolve_device(choose_device(device))  # cuda:LOCAL_RANK under torchrun, as training
    info = init_distributed(dev)

    gen = load_generator(run, dev)
    check_sampler(sampler, gen.sched.objective)  # before anything is written
    options = sampler_options(sampler)
    T = gen.sched.T
    if "steps" not in options:
        steps = T  # a sampler without steps (ancestral DDPM) walks every timestep
    elif not 1 <= steps <= T:
        raise ConfigError(f"--steps {steps} is outside 1..{T} (the model's T); use at most {T}")
    if "eta" in options and eta is None:
        eta = 0.0
    source_path = Path(masks) if masks is not None else Path(gen.meta.get("data") or "")
    if not str(source_path) or not source_path.exists():
        raise InputError(
            f"{source_path or 'the run'}: the masks to condition on are not there; pass --masks PREPARED|DIR"
        )
    sources = load_source_masks(source_path, gen.cfg.preset, gen.cfg.geometry.shape)

    settings = {
        "base_seed": seed,
        "sampler": sampler,
        "steps": steps,
        "eta": None if eta is None else float(eta),
        "guidance": float(guidance),
        "augment": augment,
        "source_dataset": str(source_path.resolve()),
        "diffusion_checkpoint": gen.meta["checkpoint_hash"],
    }
    sampling = SamplerSettings(sampler, steps, float(guidance), settings["eta"])
    preflight(backend, run, batch)  # a stale artefact or a batch outside an engine's profile: refused here
    writer = VolumeWriter(
        out, settings, rank=info.rank, world=info.world, sharded=info.enabled, layout=layout
    )
    if info.is_main:
        writer.prepare(force)
    if info.enabled:
        torch.distributed.barrier()
    todo = writer.todo(n)

    shape = gen.latent_shape
    t_dtype = torch.float32 if gen.sched.objective == "flow" else torch.long  # flow time is continuous
    example = [torch.zeros(1, *shape, device=dev), torch.zeros(1, dtype=t_dtype, device=dev),
               torch.zeros(1, gen.net.cond_cfg.embed_dim, device=dev)]  # fmt: skip
    names = ["x", "t", "cond"]
    spatial_ch = getattr(gen.net, "spatial_channels", 0)
    if spatial_ch:  # spatial conditioning: the per-step graph has a fourth input
        example.append(torch.zeros(1, spatial_ch, *shape[1:], device=dev))
        names.append("spatial")
    denoise = make_denoiser(backend, gen.net, example, names, run / "export", run=run, batch=batch)
    # onnx / trt: the decoder's artefact too (decoding runs one volume at a time); tiles use the module
    exported = make_decoder(backend, gen.vq, run, batch=1) if backend in ("onnx", "trt") else None
    window = gen.cfg.geometry.hu_window
    fields = {**settings, "backend": backend, "vqgan_checkpoint": gen.vqgan_hash, "run": str(run.resolve())}
    t0 = time.perf_counter()
    made = 0
    # SIGINT / SIGTERM: the volume being written is finished, the rest of its batch dropped (nothing
    # partial is ever written); the rerun makes what is missing.
    stopping = "after the volume being written"
    with deferred(stopping) as stop, make_progress() as progress:
        task = progress.add_task("generate", total=len(todo), status="") if info.is_main else None

        def finish(item: tuple[list[Job], list[int], torch.Tensor]) -> None:
            """Worker thread: decode, check, convert to HU and write one sampled batch."""
            nonlocal made
            jobs, seeds, x0 = item
            if dev.type == "cuda":  # a new thread starts on cuda:0; Triton launches on the current device
                torch.cuda.set_device(dev)
            finite = torch.isfinite(x0.flatten(1)).all(1).tolist()  # one cheap reduction per batch
            for job, vseed, ok, x in zip(jobs, seeds, finite, x0.split(1), strict=True):
                if worker.cancelled or stop:  # interrupted: the volumes not started yet are not written
                    return
                image = gen.decode(x, decode_tile, exported)[0] if ok else None
                if image is None or not np.isfinite(image).all():  # NaN/Inf must never become a volume
                    raise CheckpointError(
                        f"volume {volume_id(job.index)}: the sampled latents are not finite (NaN/Inf) with "
                        f"sampler {sampler}, {steps} steps, guidance {guidance}, eta {settings['eta']}; "
                        "nothing written for it; check the run's diffusion checkpoint or lower --guidance"
                    )
                line = {
                    "seed": vseed,
                    "source_case": job.source.case,
                    "augmentation": job.augmentation,
                    **fields,
                }
                writer.write(job.index, unit_to_hu(image, window), job.mask, job.source.affine, line)
                made += 1
                if task is not None:
                    rate = made / max(time.perf_counter() - t0, 1e-9) * 60
                    progress.update(task, completed=made, status=f"{rate:.1f} vol/min")

        with Background(finish, maxsize=1) as worker:
            for start in range(0, len(todo), batch):
                if stop:
                    break
                jobs = [
                    draw_job(i, sources, seed, augment, gen.cfg, gen.encode)
                    for i in todo[start : start + batch]
                ]
                seeds = [volume_seed(seed, j.index) for j in jobs]
                x0 = sample_latents(
                    gen.net,
                    denoise,
                    torch.stack([j.content for j in jobs]),
                    torch.stack([j.structure for j in jobs]),
                    seeds,
                    sampling,
                    spatial=torch.stack([j.spatial for j in jobs]) if spatial_ch else None,
                    sched=gen.sched,
                    prediction=gen.prediction,
                    shape=shape,
                    clip=gen.clip,
                    device=dev,
                )
                worker.submit((jobs, seeds, x0))
    # Under torchrun, torchrun forwards the signal to every rank; each stops after its volume. A signal that
    # came after the last volume stops nothing: the set is complete and is finalised.
    if stop and made < len(todo):
        done = n - len(todo) + made
        what = (
            f"rank {info.rank} made {made} of its {len(todo)} volumes"
            if info.enabled
            else f"{done} of {n} volumes done in {out}, the rerun makes the other {n - done}"
        )
        raise Interrupted(stop.signum or 2, f"{what}; no partial file", resume_flag="")
    if info.enabled:
        torch.distributed.barrier()  # every shard is written before rank 0 merges them
    if info.is_main:
        writer.finalize()
    if info.enabled:
        torch.distributed.barrier()
    return out
