"""The run's artefacts for ``generate --backend onnx|trt``: a matching one, an export on demand, or a refusal.

Both graphs live in ``RUN/export`` (what ``lad-fast export`` writes by default): ``denoiser.fp32.onnx`` and
``decoder.fp32.onnx`` for the onnx backend (fp32: the volumes equal the torch backend's), and
``<kind>.fp16.engine`` for trt (built from the AutoCast fp16 graph). A present artefact is checked
(:func:`lad_fast.export.artefacts.check_artefact`): one that does not fit the run's checkpoint, this
machine or the batch is refused with the reasons, never overwritten; an absent one is exported from the
loaded module (:func:`lad_fast.export.run_export._export_kind`, verified against it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lad_fast.errors import CheckpointError
from lad_fast.export.artefacts import BatchRange, artefact_name, check_artefact, clear_pending, meta_path
from lad_fast.export.run_export import (
    DEFAULT_RANGE,
    EXPORT_DIR,
    VERIFY_BATCH,
    _check_request,
    _export_kind,
    _realistic,
)
from lad_fast.utils.lock import folder_lock


def artefact_path(run: Path, kind: str, backend: str) -> tuple[Path, str]:
    """(path, precision) of the ``kind`` artefact the ``backend`` loads from ``run``."""
    precision = "fp32" if backend == "onnx" else "fp16"
    return Path(run) / EXPORT_DIR / artefact_name(kind, precision, backend), precision


def run_meta(run: Path) -> dict:
    """The diffusion checkpoint's meta of ``run`` (no weights loaded), with its ``diffusion_config``."""
    from lad_fast.config import config_from_dict
    from lad_fast.errors import ConfigError
    from lad_fast.runs.checkpoints import META_NAME, latest_step_dir, read_step_meta

    step = latest_step_dir(Path(run) / "diffusion")
    if step is None:
        raise CheckpointError(f"{run}: no complete diffusion checkpoint to export")
    meta, _ = read_step_meta(step)  # checked against the step's digest: decoding uses its latent_norm
    meta = {**meta, **(meta.get("extra") or {})}
    try:
        meta["diffusion_config"] = config_from_dict(
            {"diffusion": meta["model_config"]["diffusion"]}
        ).diffusion
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{step / META_NAME}: no usable model_config ({err})") from err
    return meta


def run_checkpoint(run: Path, kind: str, meta: dict | None = None) -> str:
    """Hash of the checkpoint the ``kind`` graph comes from: the diffusion model, or its VQ-GAN (found
    through the diffusion checkpoint's ``meta``, read here when not given)."""
    from lad_fast.runs.loading import checkpoint_hash, vqgan_run_of

    run = Path(run)
    if kind == "denoiser":
        return checkpoint_hash(run / "diffusion")
    meta = meta if meta is not None else run_meta(run)
    return checkpoint_hash(vqgan_run_of(run, meta) / "vqgan")  # recorded relative to the run


def check_run_artefact(run: Path, backend: str, batch: int | None = None, kind: str = "denoiser") -> None:
    """Refuse (CheckpointError with the reasons) the run's ``kind`` artefact for ``backend`` when one is
    there and does not fit the run's checkpoint, this machine or ``batch``; pass when there is none (or only
    the metadata of an interrupted export)."""
    path, _ = artefact_path(run, kind, backend)
    if path.exists():  # metadata alone is an interrupted export, redone on demand
        check_artefact(path, checkpoint=run_checkpoint(run, kind), batch=batch, run=run)


def denoiser_artefact(
    run: Path,
    net: nn.Module,
    example: Sequence[torch.Tensor],
    names: Sequence[str],
    backend: str,
    batch: int | None = None,
) -> Path:
    """The denoiser artefact of ``run`` for ``backend``, exported on demand from ``net`` when absent.

    example: inputs of the step (any batch; their shapes and dtypes are what counts); names: their graph
    names; batch: volumes per sampler call (an engine's profile must hold it).
    """
    meta = run_meta(run)
    cpu = [e.detach().cpu() for e in example]
    cpu = _realistic(
        [e[:1].expand(VERIFY_BATCH * 2, *e.shape[1:]).clone() for e in cpu],
        meta["diffusion_config"].objective,
        meta["diffusion_config"].timesteps,
    )
    checkpoint = run_checkpoint(run, "denoiser")
    return _one_rank_exports(run, "denoiser", checkpoint, net, cpu, list(names), "out", backend, batch)


def decoder_artefact(run: Path, vq: nn.Module, backend: str, batch: int | None = None) -> Path:
    """The decoder artefact of ``run`` (quantise + decode, :class:`~lad_fast.export.graphs.DecoderGraph`)
    for ``backend``, exported on demand from the VQ-GAN ``vq`` when absent."""
    from lad_fast.export.graphs import DECODER_INPUT, DECODER_OUTPUT, DecoderGraph

    meta = run_meta(run)
    shape = tuple(int(s) for s in meta["latent_shape"])
    module = DecoderGraph(copy.deepcopy(vq).float().cpu()).eval()
    example = [torch.rand(VERIFY_BATCH, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    checkpoint = run_checkpoint(run, "decoder", meta)
    return _one_rank_exports(
        run, "decoder", checkpoint, module, example, [DECODER_INPUT], DECODER_OUTPUT, backend, batch
    )


def _one_rank_exports(run, kind, checkpoint, module, example, names, out_name, backend, batch) -> Path:
    """:func:`_find_or_export`; under ``torchrun`` rank 0 exports while the others wait, then they check
    what it wrote (two ranks writing one file would see each other's half-made artefact)."""
    import torch.distributed as dist

    run = Path(run)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            try:
                return _find_or_export(
                    run, kind, checkpoint, module, example, names, out_name, backend, batch
                )
            finally:
                dist.barrier()  # released whether rank 0 succeeded or not
        dist.barrier()
        path, _ = artefact_path(run, kind, backend)
        if not path.exists():
            raise CheckpointError(f"{path}: rank 0 did not export it (see its error); nothing to load")
        check_artefact(path, checkpoint=checkpoint, batch=batch, run=run)
        return path
    return _find_or_export(run, kind, checkpoint, module, example, names, out_name, backend, batch)


def _find_or_export(run, kind, checkpoint, module, example, names, out_name, backend, batch) -> Path:
    """The ``kind`` artefact of ``run`` for ``backend``: checked when present (against ``checkpoint``, the
    hash of the checkpoint it must come from), else exported from ``module`` and verified."""
    path, precision = artefact_path(run, kind, backend)
    out = path.parent
    if path.exists():  # checked without the lock: generating from a read-only run needs none
        check_artefact(path, checkpoint=checkpoint, batch=batch, run=run)
        return path
    _check_request(backend, precision)
    with folder_lock(out, "export"):  # the folder is written: one exporter at a time
        clear_pending(out)  # what an interrupted export left: redone here
        if path.exists() or meta_path(path).exists():  # exported meanwhile by another process
            check_artefact(path, checkpoint=checkpoint, batch=batch, run=run)
            return path
        for graph in {artefact_name(kind, p, "onnx") for p in ("fp32", precision)}:
            if (out / graph).exists() or meta_path(
                out / graph
            ).exists():  # reused when it matches, else refused
                check_artefact(out / graph, checkpoint=checkpoint, run=run)
        brange = DEFAULT_RANGE if batch is None else BatchRange(1, batch, max(batch, DEFAULT_RANGE.max))
        if any(p.is_cuda for p in module.parameters()):
            module = copy.deepcopy(module).float().cpu()
        _export_kind(
            kind, module.eval(), example, names, out_name, out, precision, backend, brange, checkpoint
        )
    return path
