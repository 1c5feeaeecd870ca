"""Strongly typed TensorRT engines from lad-fast's ONNX graphs, and a TensorRT sampling backend.

NOT YET EXECUTED: TensorRT cannot be installed where lad-fast is developed, and the GPU machines it is
tested on have none, so this module is written against the documented Python API of TensorRT 10 and 11
(name-based I/O tensors, ``execute_async_v3``) and has never run. Its input graphs are verified numerically
through ONNX Runtime instead. ``tensorrt`` is imported lazily.

TensorRT 11 builds strongly typed networks only and removed every weak-typing API (``BuilderFlag.FP16``
and the other precision flags, precision constraints, the INT8 calibrator, ``platform_has_fast_fp16`` ...;
tests/export/test_removed_trt_api.py keeps this package off that list). So reduced precision lives in the
ONNX graph (ModelOpt AutoCast, :mod:`lad_fast.export.autocast`) and the builder takes the graph's types as
they are: on TensorRT 10 through ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, on 11 by default. One
optimisation profile spans the batch range the engine is built for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lad_fast.errors import BackendUnavailableError, LadFastError
from lad_fast.utils.atomic import write_bytes

_INSTALL_HINT = (
    'TensorRT is not installed: pip install "lad-fast[trt]" (TensorRT engines need Linux and an NVIDIA GPU '
    "with CUDA)"
)
_NO_GPU_HINT = (
    "TensorRT engines need an NVIDIA GPU with CUDA, and torch sees none here; use --target onnx, or run on "
    'a machine with an NVIDIA GPU and pip install "lad-fast[trt]"'
)


def _trt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(_INSTALL_HINT) from err
    return trt


def require_tensorrt():
    """The ``tensorrt`` module on a machine with CUDA; BackendUnavailableError (one line) otherwise."""
    trt = _trt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError(_NO_GPU_HINT)
    return trt


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network: TensorRT 11 knows no other kind; 10 needs the flag."""
    major = int(str(trt.__version__).split(".")[0])
    if major >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    shapes: dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized, strongly typed engine from an ONNX file (its types decide every precision).

    ``shapes[name] = (min, opt, max)`` per input: the one optimisation profile. Written atomically.
    """
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LadFastError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
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
        trt = require_tensorrt()
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise LadFastError(
                f"{engine_path}: not a TensorRT engine for this TensorRT version and GPU; re-export it with "
                "`lad-fast export --target trt --force`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.batch_range = (int(lo[0]), int(hi[0]))

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
        }
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.inputs):
            raise LadFastError(f"TensorRT denoiser takes {len(self.inputs)} inputs, got {len(inputs)}")
        lo, hi = self.batch_range
        if not lo <= inputs[0].shape[0] <= hi:
            raise LadFastError(
                f"TensorRT engine: batch {inputs[0].shape[0]} is outside its optimisation profile {lo}..{hi}"
            )
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
