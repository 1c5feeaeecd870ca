"""ONNX export of the denoiser and an ONNX Runtime sampling backend.

The exported graph is the network with every lad-fast op on its PyTorch reference path (standard ONNX
ops: Conv, GroupNormalization or its decomposition, attention as MatMul/Softmax), so ONNX Runtime and
TensorRT's ONNX parser both read it. The batch axis is dynamic; guidance doubles it. Every graph written
here passes ``onnx.checker`` before it is renamed into place. Opset 18: the lowest opset that TensorRT 10
and 11 and ONNX Runtime all read with GroupNormalization's decomposition and dynamic Reshape intact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lad_fast.errors import BackendUnavailableError, LadFastError
from lad_fast.kernels._dispatch import forced_impl
from lad_fast.utils.atomic import atomic_path

DEFAULT_OPSET = 18


def export_onnx(
    net: torch.nn.Module,
    example: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_name: str = "out",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``net(*example)`` to ``path`` with a dynamic batch axis on every input and the output.

    Inputs are CPU tensors whose first axis is the batch. Written atomically, after ``onnx.checker``
    accepted the graph (a graph it refuses is never visible at ``path``).
    """
    try:
        import onnx
    except ImportError as err:
        raise BackendUnavailableError(
            "ONNX export needs the onnx package: pip install 'lad-fast[onnx]'"
        ) from err
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
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise LadFastError(f"{path}: the exported graph fails the ONNX checker: {err}") from err
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
                f"{path}: no ONNX file; write one with `lad-fast export --run RUN` (or "
                "lad_fast.export.onnx.export_onnx), or let `lad-fast generate --backend onnx` export "
                "the run's denoiser itself"
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


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |ref - got| / max |ref| (the scale of the output, so near-zero entries do not blow it up)."""
    ref, got = ref.double(), got.double()
    return ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def verify_onnx(
    net: torch.nn.Module,
    onnx_path: str | Path,
    example: Sequence[torch.Tensor],
    atol: float = 1e-4,
    rtol: float | None = None,
    name: str | Path | None = None,
) -> float:
    """Difference between PyTorch and ONNX Runtime on ``example``; raises if above the tolerance.

    Without ``rtol``: the max absolute difference, checked against ``atol``. With ``rtol``: the relative
    error of :func:`relative_error`, checked against ``rtol`` (``atol`` ignored). ``name``: the file the
    error names (default ``onnx_path``; the artefact's own name when a staged copy is verified).
    """
    name = onnx_path if name is None else name
    with torch.no_grad(), forced_impl("torch"):
        ref = net.eval()(*example).float()
    got = OnnxDenoiser(onnx_path)(*example).float()
    if rtol is not None:
        err = relative_error(ref, got)
        if not err <= rtol:
            raise LadFastError(
                f"{name}: ONNX Runtime differs from PyTorch by {err:.3g} relative (> {rtol:g})"
            )
        return err
    err = (ref - got).abs().max().item()
    if not err <= atol:
        raise LadFastError(f"{name}: ONNX Runtime differs from PyTorch by {err:.3g} (> {atol:g})")
    return err
