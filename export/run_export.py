"""``lad-fast export``: a trained run's denoiser and decoder as ONNX graphs and TensorRT engines.

:func:`export_run` writes, into ``RUN/export`` or ``--out``, for each of the denoiser step and the decoder
(:mod:`lad_fast.export.graphs`): the fp32 ONNX graph, its fp16 or bf16 variant made by ModelOpt AutoCast
(:mod:`lad_fast.export.autocast`), and with ``--target trt`` a strongly typed TensorRT engine built from
the graph of the chosen precision; each with its metadata (:mod:`lad_fast.export.artefacts`). Every ONNX
graph is checked by ``onnx.checker`` and compared with PyTorch through ONNX Runtime before it counts.

What ``generate --backend onnx|trt`` loads, and when it exports on demand: :mod:`lad_fast.export.select`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lad_fast.errors import ConfigError, OutputExistsError
from lad_fast.export.artefacts import (
    GRAPH_BATCH_FACTOR,
    TARGETS,
    BatchRange,
    artefact_name,
    damage,
    meta_path,
    mismatches,
    prepare_out,
    publish,
    read_meta,
    staging_path,
)
from lad_fast.export.autocast import PRECISIONS

EXPORT_DIR = "export"  # RUN/export: where generate looks for artefacts and lad-fast export writes them
DEFAULT_RANGE = BatchRange(1, 4, 16)
FP32_RTOL = 1e-4  # ONNX Runtime vs PyTorch, max |diff| / max |ref|
# AutoCast graphs vs fp32 PyTorch: fp16 keeps 11 bits (4.9e-4 relative per rounding), bf16 8 bits (3.9e-3);
# a few roundings in a row stay below these. ONNX Runtime's CPU build has no bf16 Conv, so bf16 graphs are
# checked but not compared there.
LOW_RTOL = {"fp16": 1e-2, "bf16": 6e-2}
# volumes per export and verification call (the denoiser sees 2: guidance); the tests run other batches
VERIFY_BATCH = 1


def _graph_shapes(example: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, dict]:
    return {
        n: {"shape": ["batch", *e.shape[1:]], "dtype": str(e.dtype).removeprefix("torch.")}
        for n, e in zip(names, example, strict=True)
    }


def _onnx_outputs(path: Path) -> dict[str, dict]:
    """{name: {"shape", "dtype"}} of the graph's outputs, the batch axis named "batch"."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        o.name: {
            "shape": ["batch", *(d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim[1:])],
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name,
        }
        for o in graph.output
    }


def _export_kind(
    kind: str,
    module: nn.Module,
    example: list[torch.Tensor],
    names: list[str],
    out_name: str,
    out: Path,
    precision: str,
    target: str,
    brange: BatchRange,
    checkpoint: str,
) -> list[Path]:
    """fp32 graph [+ low-precision graph] [+ engine] of one module into ``out``; returns what it wrote."""
    from lad_fast.export.onnx import DEFAULT_OPSET, export_onnx, verify_onnx

    factor = GRAPH_BATCH_FACTOR[kind]
    common = {
        "kind": kind,
        "checkpoint": checkpoint,
        "inputs": _graph_shapes(example, names),
        "graph_batch_factor": factor,
    }
    written = []
    fp32 = out / artefact_name(kind, "fp32", "onnx")
    if not _reusable(fp32, checkpoint):
        staged = staging_path(fp32)
        with _removed_on_error(staged):
            export_onnx(module, example, staged, names, output_name=out_name)
            err = verify_onnx(module, staged, example, rtol=FP32_RTOL, name=fp32)
            common["outputs"] = _onnx_outputs(staged)
            publish(staged, fp32, target="onnx", precision="fp32", opset=DEFAULT_OPSET, batch=brange,
                    **common, verified={"relative_error": err, "tolerance": FP32_RTOL})  # fmt: skip
        written += [fp32, meta_path(fp32)]
    common.setdefault("outputs", read_meta(fp32).get("outputs"))  # reused fp32 graph: as recorded
    graph = fp32
    if precision != "fp32":
        graph = out / artefact_name(kind, precision, "onnx")
        if not _reusable(graph, checkpoint):
            written += _autocast_kind(kind, module, example, fp32, graph, precision, brange, common)
    if target == "trt":
        from lad_fast.export.tensorrt import build_engine

        engine = out / artefact_name(kind, precision, "trt")
        shapes = {
            n: tuple((b * factor, *e.shape[1:]) for b in (brange.min, brange.opt, brange.max))
            for n, e in zip(names, example, strict=True)
        }
        staged = staging_path(engine)
        with _removed_on_error(staged):
            build_engine(graph, staged, shapes)
            publish(staged, engine, target="trt", precision=precision, batch=brange, source=graph.name,
                    opset=read_meta(graph).get("opset"),
                    profile={n: [list(s) for s in v] for n, v in shapes.items()}, **common)  # fmt: skip
        written += [engine, meta_path(engine)]
    return written


def _autocast_kind(
    kind: str, module: nn.Module, example, fp32: Path, graph: Path, precision: str, brange, common
) -> list[Path]:
    """The AutoCast variant of ``fp32`` at ``graph``, verified against ``module``, with its metadata."""
    import onnx

    from lad_fast.export.autocast import autocast_onnx, nodes_fed_only_by
    from lad_fast.export.graphs import decoder_fp32_nodes
    from lad_fast.export.onnx import verify_onnx

    model = onnx.load(str(fp32))
    keep = nodes_fed_only_by(model, ["t"]) if kind == "denoiser" else decoder_fp32_nodes(model)
    staged = staging_path(graph)
    with _removed_on_error(staged):
        summary = autocast_onnx(fp32, staged, precision, fp32_nodes=keep)
        try:
            err = verify_onnx(module, staged, example, rtol=LOW_RTOL[precision], name=graph)
            verified: dict = {"relative_error": err, "tolerance": LOW_RTOL[precision]}
        except Exception as e:  # onnxruntime's NotImplemented has no public class to catch
            if "NOT_IMPLEMENTED" not in str(e):
                raise
            # ONNX Runtime's CPU build has no bf16 Conv: the graph is checked, not compared, here
            verified = {"skipped": f"ONNX Runtime cannot run this {precision} graph here: {str(e)[:200]}"}
            warnings.warn(f"{graph.name}: not compared with PyTorch ({verified['skipped']})", stacklevel=2)
        publish(staged, graph, target="onnx", precision=precision, opset=summary["opset"], batch=brange,
                source=fp32.name, autocast=summary, verified=verified, **common)  # fmt: skip
    return [graph, meta_path(graph)]


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    """A staged artefact whose export or verification fails is removed (its metadata is not written)."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _reusable(path: Path, checkpoint: str) -> bool:
    """Whether ``path`` is already a matching export (an on-demand TensorRT export reuses the ONNX graph)."""
    meta = read_meta(path)
    return (
        meta is not None and damage(meta, path) is None and not mismatches(meta, path, checkpoint=checkpoint)
    )


def _check_request(target: str, precision: str) -> None:
    """Refuse bad options and missing packages before anything is loaded or written."""
    if target not in TARGETS:
        raise ConfigError(f"unknown --target {target!r}; choose one of: {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if target == "trt":
        from lad_fast.export.tensorrt import require_tensorrt

        require_tensorrt()
    if precision != "fp32":
        from lad_fast.export.autocast import require_autocast

        require_autocast()


def export_run(
    run: Path,
    out: Path | None = None,
    target: str = "onnx",
    precision: str = "fp16",
    batch_range: BatchRange = DEFAULT_RANGE,
    force: bool = False,
) -> list[Path]:
    """Export the denoiser step and the decoder of ``run`` into ``out`` (default ``RUN/export``).

    Writes ``<kind>.fp32.onnx``, with ``precision`` fp16/bf16 also ``<kind>.<precision>.onnx``, and with
    ``target`` "trt" ``<kind>.<precision>.engine``, each beside its ``.json`` metadata; returns the paths
    written. ``out`` holding other files is refused without ``force`` (see
    :func:`~lad_fast.export.artefacts.prepare_out`); an export interrupted there is redone. ``out`` is
    locked for the whole export (:class:`~lad_fast.utils.lock.FolderLock`): a second export into it is
    refused. Graphs are exported and verified on the CPU.
    """
    from lad_fast.utils.lock import folder_lock

    _check_request(target, precision)
    run = Path(run)
    out = Path(out) if out is not None else run / EXPORT_DIR
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; choose a folder")
    with folder_lock(out, "export"):
        return _export_run(run, out, target, precision, batch_range, force)


def _export_run(
    run: Path, out: Path, target: str, precision: str, batch_range: BatchRange, force: bool
) -> list[Path]:
    from lad_fast.runs.loading import load_sampling_models

    models = load_sampling_models(run, "cpu")  # the run opened, its config parsed, once
    net, meta, vq = models.net, models.meta, models.vq
    names = [artefact_name(k, "fp32", "onnx") for k in ("denoiser", "decoder")]
    if precision != "fp32":
        names += [artefact_name(k, precision, "onnx") for k in ("denoiser", "decoder")]
    if target == "trt":
        names += [artefact_name(k, precision, "trt") for k in ("denoiser", "decoder")]
    prepare_out(out, names + [n + ".json" for n in names], force)
    out.mkdir(parents=True, exist_ok=True)

    from lad_fast.export.graphs import DECODER_INPUT, DECODER_OUTPUT, DecoderGraph, denoiser_example

    shape = tuple(int(s) for s in meta["latent_shape"])
    objective = meta["diffusion_config"].objective
    den_example, den_names = denoiser_example(net, shape, objective, batch=VERIFY_BATCH * 2)
    den_example = _realistic(den_example, objective, meta["diffusion_config"].timesteps)
    written = _export_kind("denoiser", net, den_example, den_names, "out", out, precision, target,
                           batch_range, meta["checkpoint_hash"])  # fmt: skip
    decoder = DecoderGraph(vq).eval()
    dec_example = [torch.rand(VERIFY_BATCH, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    written += _export_kind("decoder", decoder, dec_example, [DECODER_INPUT], DECODER_OUTPUT, out, precision,
                            target, batch_range, models.vqgan_hash)  # fmt: skip
    return written


def _realistic(example: list[torch.Tensor], objective: str, timesteps: int) -> list[torch.Tensor]:
    """Verification inputs: noise-like x and conditions, times spread over the schedule (zeros would hide
    errors that only show away from 0)."""
    g = torch.Generator().manual_seed(0)
    out = [e.clone() for e in example]
    out[0] = torch.randn(out[0].shape, generator=g)
    b = out[1].shape[0]
    times = torch.linspace(0, timesteps - 1, b)  # the network sees t in 0..T-1 (flow: scaled, float)
    out[1] = times if objective == "flow" else times.round().long()
    out[2] = torch.randn(out[2].shape, generator=g)
    if len(out) > 3:
        out[3] = (torch.rand(out[3].shape, generator=g) > 0.5).float()
    return out
