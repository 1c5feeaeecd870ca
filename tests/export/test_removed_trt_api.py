"""No lad-fast code uses a TensorRT Python API that TensorRT 11 removed.

The list is NVIDIA's "Removed Python APIs and Replacements" of the TensorRT 10.x to 11.x migration guide
(docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html):
the weak-typing builder flags, the INT8 calibration and quantization-flag API, the platform queries, and
the algorithm selector ("will cause runtime errors if called"). The scan reads the code's syntax tree
(attribute and name uses, and strings given to ``getattr``), so comments and docstrings may name them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("lad_fast", "export", "kernels", "cli", "bench")

# BuilderFlag members removed in 11.x (precision is in the graph: strong typing)
REMOVED_FLAGS = frozenset(
    {"FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "DIRECT_IO",
     "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
)  # fmt: skip
# Methods and properties removed in 11.x, unique enough to flag wherever they appear
REMOVED_MEMBERS = frozenset(
    {
        "int8_calibrator",  # IBuilderConfig
        "set_calibration_profile",
        "get_calibration_profile",
        "set_quantization_flag",
        "get_quantization_flag",
        "quantization_flags",
        "clear_quantization_flag",
        "platform_has_fast_fp16",  # Builder
        "platform_has_fast_int8",
        "algorithm_selector",  # IAlgorithmSelector and friends: editable timing cache instead
        "IAlgorithmSelector",
        "IInt8Calibrator",
        "IInt8EntropyCalibrator2",
        "IInt8MinMaxCalibrator",
        "IInt8LegacyCalibrator",
        "device_memory_size",  # ICudaEngine: device_memory_size_v2 replaces it
    }
)


def removed_uses(source: str) -> list[str]:
    """``"line: API"`` for each use of a removed TensorRT API in Python ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Attribute):
            parent = node.value
            parent_name = parent.attr if isinstance(parent, ast.Attribute) else getattr(parent, "id", None)
            if node.attr in REMOVED_FLAGS and parent_name == "BuilderFlag":
                name = f"BuilderFlag.{node.attr}"
            elif node.attr in REMOVED_MEMBERS:
                name = node.attr
        elif isinstance(node, ast.Name) and node.id in REMOVED_MEMBERS:
            name = node.id
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in REMOVED_FLAGS | REMOVED_MEMBERS
        ):
            name = f"getattr(..., {node.args[1].value!r})"
        if name:
            found.append((node.lineno, name))
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_the_scan_finds_each_kind_of_use():
    code = (
        "config.set_flag(trt.BuilderFlag.FP16)\n"
        "config.int8_calibrator = calib\n"
        "if builder.platform_has_fast_fp16: pass\n"
        "flag = getattr(trt.BuilderFlag, 'OBEY_PRECISION_CONSTRAINTS')\n"
        "size = engine.device_memory_size\n"
    )
    assert removed_uses(code) == [
        "1: BuilderFlag.FP16",
        "2: int8_calibrator",
        "3: platform_has_fast_fp16",
        "4: getattr(..., 'OBEY_PRECISION_CONSTRAINTS')",
        "5: device_memory_size",
    ]
    # what the builder does instead is not flagged: strongly typed network, replacement size query
    ok = (
        "n = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
        "size = engine.device_memory_size_v2\n"
        "x = torch.float16  # BuilderFlag.FP16 in a comment\n"
    )
    assert removed_uses(ok) == []


@pytest.mark.parametrize("folder", SCANNED)
def test_no_removed_tensorrt_api_in_the_code(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files or folder == "bench"
    uses = {
        str(f.relative_to(ROOT)): hits for f in files if (hits := removed_uses(f.read_text(encoding="utf-8")))
    }
    assert uses == {}, f"TensorRT 11 removed these APIs: {uses}"
