"""Sampling backends behind one denoiser interface: ``denoise(x, t, *cond) -> prediction``.

| backend  | what runs                                                         | verified here |
| -------- | ----------------------------------------------------------------- | ------------- |
| torch    | the eager module under ``torch.no_grad``                          | yes (CPU)     |
| compile  | ``torch.compile``; on CUDA with CUDA graphs ("reduce-overhead")   | CPU only      |
| onnx     | the exported ONNX graph in ONNX Runtime                           | yes (CPU)     |
| trt      | a strongly typed TensorRT engine from the AutoCast fp16 graph     | never run     |

With ``run`` (what ``generate`` passes) the onnx and trt backends use the run's exported artefacts
(``RUN/export``, :func:`lad_fast.export.select.denoiser_artefact`): a matching one is loaded, a missing
one exported on demand, a stale or foreign one refused with the reason. Without ``run`` (tests, toy nets)
graphs are cached in ``cache_dir`` under a hash of the weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lad_fast.errors import ConfigError

BACKENDS = ("torch", "compile", "onnx", "trt")
Denoiser = Callable[..., torch.Tensor]


def _net_hash(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def make_denoiser(
    backend: str,
    net: torch.nn.Module,
    example: Sequence[torch.Tensor],
    input_names: Sequence[str],
    cache_dir: str | Path,
    max_batch: int = 16,
    *,
    run: str | Path | None = None,
    batch: int | None = None,
) -> Denoiser:
    """A callable with the signature of ``net`` for the chosen backend.

    ``example`` are inputs of the right shapes (batch 1 is fine). With ``run``: onnx and trt use the run's
    artefacts (see the module docstring), ``batch`` (volumes per sampler call) must lie in an engine's
    profile. Without: ``cache_dir`` keeps exported graphs and engines, named by a hash of the weights so a
    new checkpoint never reuses an old engine.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    net = net.eval()
    if backend == "torch":
        return torch.no_grad()(net)
    if backend == "compile":
        mode = "reduce-overhead" if next(net.parameters()).is_cuda else None  # CUDA graphs on GPU
        return torch.no_grad()(torch.compile(net, mode=mode, dynamic=False))

    if backend == "trt":  # before anything is exported: one line on what to install
        from lad_fast.export.tensorrt import require_tensorrt

        require_tensorrt()
    from lad_fast.export.onnx import OnnxDenoiser, export_onnx, verify_onnx

    if run is not None:
        from lad_fast.export.select import denoiser_artefact

        path = denoiser_artefact(Path(run), net, example, input_names, backend, batch)
        if backend == "onnx":
            return OnnxDenoiser(path)
        from lad_fast.export.tensorrt import TensorRTDenoiser

        return TensorRTDenoiser(path)

    cache_dir = Path(cache_dir)
    onnx_path = cache_dir / f"denoiser-{_net_hash(net)}.onnx"
    cpu_net = net if not next(net.parameters()).is_cuda else None
    if not onnx_path.is_file():
        src = cpu_net if cpu_net is not None else _cpu_copy(net)
        cpu_example = [e.detach().cpu() for e in example]
        export_onnx(src, cpu_example, onnx_path, input_names)
        verify_onnx(src, onnx_path, cpu_example, atol=1e-3)
    if backend == "onnx":
        return OnnxDenoiser(onnx_path)

    from lad_fast.export.autocast import autocast_onnx, nodes_fed_only_by
    from lad_fast.export.tensorrt import TensorRTDenoiser, build_engine

    fp16_path = onnx_path.with_suffix(".fp16.onnx")
    if not fp16_path.is_file():
        import onnx

        keep = nodes_fed_only_by(onnx.load(str(onnx_path)), input_names[1:2])  # the time embedding
        autocast_onnx(onnx_path, fp16_path, "fp16", fp32_nodes=keep)
    engine_path = onnx_path.with_suffix(".fp16.engine")
    if not engine_path.is_file():
        shapes = {
            name: ((1, *e.shape[1:]), (max_batch, *e.shape[1:]), (2 * max_batch, *e.shape[1:]))
            for name, e in zip(input_names, example, strict=True)
        }
        build_engine(fp16_path, engine_path, shapes)
    return TensorRTDenoiser(engine_path)


def make_decoder(backend: str, vq: torch.nn.Module, run: str | Path, batch: int | None = None) -> Denoiser:
    """``decode(latent) -> image`` for the chosen backend: latent (B, C, d, h, w) in the VQ-GAN's unit
    range -> image (B, 1, D, H, W) in [-1, 1] (quantise + decode,
    :class:`~lad_fast.export.graphs.DecoderGraph`).

    torch and compile run the module; onnx and trt the run's decoder artefact (``RUN/export``, exported on
    demand like the denoiser's). ``generate --backend onnx|trt`` decodes every whole volume through it.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend in ("torch", "compile"):
        from lad_fast.export.graphs import DecoderGraph

        module = DecoderGraph(vq).eval()
        return torch.no_grad()(module if backend == "torch" else torch.compile(module, dynamic=False))
    if backend == "trt":
        from lad_fast.export.tensorrt import require_tensorrt

        require_tensorrt()
    from lad_fast.export.select import decoder_artefact

    path = decoder_artefact(Path(run), vq, backend, batch)
    if backend == "onnx":
        from lad_fast.export.onnx import OnnxDenoiser

        return OnnxDenoiser(path)
    from lad_fast.export.tensorrt import TensorRTDenoiser

    return TensorRTDenoiser(path)


def preflight(backend: str, run: str | Path, batch: int | None = None) -> None:
    """Refuse, before anything is written, what ``make_denoiser(backend, ..., run=run, batch=batch)`` would:
    TensorRT missing or no CUDA (trt), or a stale, foreign or too-small artefact in ``RUN/export``."""
    if backend not in ("onnx", "trt"):
        return
    if backend == "trt":
        from lad_fast.export.tensorrt import require_tensorrt

        require_tensorrt()
    from lad_fast.export.select import check_run_artefact

    check_run_artefact(Path(run), backend, batch)


def _cpu_copy(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net).float().cpu()
