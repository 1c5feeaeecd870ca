"""ONNX export of the denoiser and an ONNX Runtime sampling backend.

The exported graph is the network with every lad-fast op on its PyTorch reference path (standard ONNX
ops: Conv, GroupNormalization or its decomposition, attention as MatMul/Softmax), so ONNX Runtime and
TensorRT's ONNX parser both read it. The batch axis is dynamic; guidance doubles it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lad_fast.atomic import atomic_path
from lad_fast.errors import BackendUnavailableError, LadFastError
from lad_fast.kernels._dispatch import forced_impl

DEFAULT_OPSET = 17


def export_onnx(
    net: torch.nn.Module,
    example: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_name: str = "out",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``net(*example)`` to ``path`` with a dynamic batch axis on every input and the output.

    Inputs are CPU tensors whose first axis is the batch. Written atomically.
    """
    path = Path(path)
    if len(input_names) != len(example):
        raise LadFastError(f"export_onnx: {len(example)} example inputs but {len(input_names)} names")
    dynamic = {name: {0: "batch"} for name in input_names}
    dynamic[output_name] = {0: "batch"}
    net = net.eval()
    with (
        atomic_path(path, suffix=".onnx") as tmp,
        forced_impl("torch"),
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation chatter
        torch.onnx.export(
            net,
            tuple(example),
            str(tmp),
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


class OnnxDenoiser:
    """``denoise(x, t, *cond)`` through ONNX Runtime: torch tensors in, torch tensors out."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailableError(
                "the onnx backend needs ONNX Runtime: pip install 'lad-fast[onnx]'"
            ) from err
        path = Path(path)
        if not path.is_file():
            raise BackendUnavailableError(
                f"{path}: no ONNX file; write one with lad_fast.export.onnx.export_onnx, or let "
                "`lad-fast generate --backend onnx` export the run's denoiser itself"
            )
        available = ort.get_available_providers()
        chosen = [
            p for p in (providers or ("CUDAExecutionProvider", "CPUExecutionProvider")) if p in available
        ]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise LadFastError(f"ONNX denoiser takes {len(self.input_names)} inputs, got {len(inputs)}")
        feeds = {}
        for name, value in zip(self.input_names, inputs, strict=True):
            arr = value.detach().cpu().numpy()
            if self.input_types[name] == "tensor(float)":
                arr = arr.astype(np.float32, copy=False)
            elif self.input_types[name] == "tensor(int64)":
                arr = arr.astype(np.int64, copy=False)
            feeds[name] = arr
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).to(inputs[0].device)


def verify_onnx(
    net: torch.nn.Module, onnx_path: str | Path, example: Sequence[torch.Tensor], atol: float = 1e-4
) -> float:
    """Max abs difference between PyTorch and ONNX Runtime on ``example``; raises if above ``atol``."""
    with torch.no_grad(), forced_impl("torch"):
        ref = net.eval()(*example).float()
    got = OnnxDenoiser(onnx_path)(*example).float()
    err = (ref - got).abs().max().item()
    if not err <= atol:
        raise LadFastError(f"{onnx_path}: ONNX Runtime differs from PyTorch by {err:.3g} (> {atol:g})")
    return err
