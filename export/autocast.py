"""Reduced-precision ONNX graphs through NVIDIA ModelOpt's ONNX AutoCast.

TensorRT 11 builds strongly typed networks only: the precision of every tensor comes from the ONNX graph,
not from builder flags. AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``) rewrites an fp32
graph into a mixed fp16 (or bf16) one and inserts the casts itself; lad-fast only says what stays fp32:

* the graph's inputs and outputs (``keep_io_types``), so callers feed and read fp32 whatever the variant;
* normalisation and softmax, by op type (:data:`FP32_OP_TYPES`): the TorchScript exporter writes
  GroupNorm as Reshape + InstanceNormalization + affine, so InstanceNormalization is the GroupNorm statistic;
* nodes named by the caller: the time embedding of the denoiser (:func:`nodes_fed_only_by`: everything
  computed from ``t`` alone, the sinusoid and the time MLP; sin/cos of t up to T=1000 lose their phase in
  fp16) and the codebook search of the decoder (VQ distances in fp32, as in training);
* AutoCast's own data-range rule: with its reference run it keeps any node whose values exceed 512 in fp32.

ModelOpt's ``[onnx]`` extra pulls GPU wheels (onnxruntime-gpu, cupy); AutoCast itself runs on a CPU and
imports only the modules listed in :data:`AUTOCAST_PACKAGES` (the ``export`` extra of lad-fast).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from lad_fast.errors import BackendUnavailableError, LadFastError
from lad_fast.utils.atomic import atomic_path

# What ``import modelopt.onnx.autocast`` and one conversion import (nvidia-modelopt 0.47), found by
# importing it with each missing module added by name: not its [onnx] extra, which adds GPU wheels.
AUTOCAST_PACKAGES = (
    "nvidia-modelopt",
    "onnx-graphsurgeon",
    "onnxslim",
    "onnxscript",
    "onnx-ir",
    "lief",
    "polygraphy",
    "nvidia-ml-py",
    "tqdm",
)
INSTALL_HINT = (
    "fp16/bf16 ONNX graphs are made by NVIDIA ModelOpt's ONNX AutoCast, which is not installed: "
    'pip install "lad-fast[export]" (nvidia-modelopt and what its autocast imports: '
    f"{', '.join(AUTOCAST_PACKAGES[1:])}), or export with --precision fp32"
)
FP32_OP_TYPES = ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "Softmax")
PRECISIONS = ("fp32", "fp16", "bf16")
# bf16 needs opset 22 in ONNX (Cast and most ops gained bfloat16 there); fp16 keeps the export's opset
_MIN_OPSET = {"fp16": None, "bf16": 22}


def require_autocast():
    """The ``modelopt.onnx.autocast`` module, or BackendUnavailableError naming what to install."""
    try:
        module = importlib.import_module("modelopt.onnx.autocast")
    except ImportError as err:
        raise BackendUnavailableError(f"{INSTALL_HINT} ({err})") from err
    # ModelOpt logs every skipped node at INFO (and optional empty inputs at WARNING); the artefact's
    # metadata keeps the summary instead
    module.configure_logging(level=logging.ERROR)
    logging.getLogger("modelopt.onnx").setLevel(logging.ERROR)
    return module


def nodes_fed_only_by(model, inputs: Iterable[str]) -> list[str]:
    """Names of the nodes of ``model`` (an ``onnx.ModelProto``) computed from ``inputs`` and constants
    alone, e.g. the time embedding of a denoiser from ``t``: what a graph input feeds before it meets
    any other input."""
    graph = model.graph
    constant = {init.name for init in graph.initializer} | {""}
    fed = set(inputs)
    names = []
    for node in graph.node:  # ONNX graphs are stored in topological order
        if not node.input:  # Constant and friends: values, not computations on an input
            constant.update(node.output)
            continue
        if all(i in fed or i in constant for i in node.input) and any(i in fed for i in node.input):
            fed.update(node.output)
            names.append(node.name)
        elif all(i in constant for i in node.input):
            constant.update(node.output)
    return names


def autocast_onnx(
    src: str | Path,
    dst: str | Path,
    precision: str = "fp16",
    fp32_nodes: Sequence[str] = (),
    fp32_op_types: Sequence[str] = FP32_OP_TYPES,
) -> dict:
    """Write ``dst``: the fp32 graph ``src`` in mixed ``precision`` ("fp16" or "bf16") by ModelOpt AutoCast.

    I/O stays fp32; ``fp32_nodes`` (exact node names) and ``fp32_op_types`` stay fp32. The result passes
    ``onnx.checker`` before it is renamed into place. Returns a summary for the artefact's metadata:
    {"fp32_op_types", "fp32_nodes", "low_precision_nodes", "nodes", "opset"}.
    """
    import re

    import onnx

    if precision not in ("fp16", "bf16"):
        raise LadFastError(f"autocast_onnx: precision must be fp16 or bf16, got {precision!r}")
    autocast = require_autocast()
    src, dst = Path(src), Path(dst)
    model = autocast.convert_to_mixed_precision(
        onnx_path=str(src),
        low_precision_type=precision,
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in fp32_nodes],
        op_types_to_exclude=list(fp32_op_types),
        keep_io_types=True,
        opset=_MIN_OPSET[precision],
        providers=["cpu"],
    )
    low = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    n_low = sum(1 for n in model.graph.node if n.op_type == "Cast" and any(a.i == low for a in n.attribute))
    with atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise LadFastError(f"{dst}: the {precision} graph fails the ONNX checker: {err}") from err
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "fp32_op_types": list(fp32_op_types),
        "fp32_nodes": len(fp32_nodes),
        "casts_to_low_precision": n_low,
        "nodes": len(model.graph.node),
        "opset": opset,
    }
