"""TensorRT fp16 engines for the denoiser, and a TensorRT sampling backend.

NOT YET EXECUTED: TensorRT and torch-tensorrt cannot be installed where lad-fast is developed, so this
module is written against TensorRT 10's documented Python API (name-based I/O tensors, ``enqueueV3``)
and has never run. Its input (the ONNX graph from :mod:`lad_fast.export.onnx`) is verified numerically
through ONNX Runtime instead. The import of ``tensorrt`` is optional and lazy.

Route: PyTorch -> ONNX (opset 17, dynamic batch) -> ``trt.OnnxParser`` -> fp16 engine with one
optimisation profile over the batch sizes sampling uses (guidance doubles the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lad_fast.atomic import write_bytes
from lad_fast.errors import BackendUnavailableError, LadFastError

_INSTALL_HINT = "TensorRT is not installed: pip install 'lad-fast[trt]' (needs Linux and an NVIDIA GPU)"


def _trt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(_INSTALL_HINT) from err
    return trt


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    shapes: dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
    fp16: bool = True,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized engine from an ONNX file. ``shapes[name] = (min, opt, max)`` per input."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LadFastError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LadFastError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    write_bytes(engine_path, bytes(serialized))
    return Path(engine_path)


class TensorRTDenoiser:
    """``denoise(*inputs)`` through a TensorRT engine: CUDA torch tensors in and out, no host copies."""

    def __init__(self, engine_path: str | Path) -> None:
        trt = _trt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the trt backend needs a CUDA GPU")
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise LadFastError(f"{engine_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
        }
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.inputs):
            raise LadFastError(f"TensorRT denoiser takes {len(self.inputs)} inputs, got {len(inputs)}")
        keep = []
        for name, value in zip(self.inputs, inputs, strict=True):
            value = value.to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            keep.append(value)  # keep alive until the stream has run
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        (out_name,) = self.outputs
        out = torch.empty(
            tuple(self.context.get_tensor_shape(out_name)), dtype=self._torch_dtype(out_name), device="cuda"
        )
        self.context.set_tensor_address(out_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise LadFastError("TensorRT execution failed")
        return out.float()
