"""Sampling backends behind one denoiser interface: ``denoise(x, t, *cond) -> prediction``.

| backend  | what runs                                                         | verified here |
| -------- | ----------------------------------------------------------------- | ------------- |
| torch    | the eager module under ``torch.no_grad``                          | yes (CPU)     |
| compile  | ``torch.compile``; on CUDA with CUDA graphs ("reduce-overhead")   | CPU only      |
| onnx     | the exported ONNX graph in ONNX Runtime                           | yes (CPU)     |
| trt      | a TensorRT fp16 engine built from that ONNX graph                 | never run     |
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
) -> Denoiser:
    """A callable with the signature of ``net`` for the chosen backend.

    ``example`` are inputs of the right shapes (batch 1 is fine); ``cache_dir`` keeps exported graphs
    and engines, named by a hash of the weights so a new checkpoint never reuses an old engine.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    net = net.eval()
    if backend == "torch":
        return torch.no_grad()(net)
    if backend == "compile":
        mode = "reduce-overhead" if next(net.parameters()).is_cuda else None  # CUDA graphs on GPU
        return torch.no_grad()(torch.compile(net, mode=mode, dynamic=False))

    from lad_fast.export.onnx import OnnxDenoiser, export_onnx, verify_onnx

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

    from lad_fast.export.tensorrt import TensorRTDenoiser, build_engine

    engine_path = onnx_path.with_suffix(".fp16.engine")
    if not engine_path.is_file():
        shapes = {
            name: ((1, *e.shape[1:]), (max_batch, *e.shape[1:]), (2 * max_batch, *e.shape[1:]))
            for name, e in zip(input_names, example, strict=True)
        }
        build_engine(onnx_path, engine_path, shapes, fp16=True)
    return TensorRTDenoiser(engine_path)


def _cpu_copy(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net).float().cpu()
