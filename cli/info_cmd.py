"""``lad-fast info``: versions, and which backends this machine can use."""

from __future__ import annotations

import importlib
import os


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # any import failure means "not usable here"
        return None
    return str(getattr(mod, "__version__", "installed"))


def backend_report() -> dict[str, str]:
    """What each backend answers on this machine, as short strings."""
    import torch

    import lad_fast

    cuda = torch.cuda.is_available()
    triton = _version("triton")
    report = {
        "lad-fast": lad_fast.__version__,
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
        "torch": torch.__version__,
        "cuda": (f"yes ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else "no"),
        "triton": (
            f"{triton} (GPU kernels)"
            if triton and cuda
            else f"{triton} (no GPU)"
            if triton
            else "no (optional: pip install 'lad-fast[triton]')"
        ),
        "triton interpreter": (
            "on (TRITON_INTERPRET=1)"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "available (set TRITON_INTERPRET=1)"
            if triton
            else "no"
        ),
        "cupy": _version("cupy") or "no",
        "onnxruntime": _version("onnxruntime") or "no",
        "tensorrt": _version("tensorrt") or "no",
        "modelopt (fp16 ONNX)": _version("modelopt") or "no (pip install 'lad-fast[export]')",
        "nibabel": _version("nibabel") or "no",
        "pydicom": _version("pydicom") or "no (pip install 'lad-fast[dicom]')",
        "gudhi": _version("gudhi") or "no",
    }
    return report


def info() -> None:
    """Print versions and which backends (CUDA, Triton, cupy, ONNX Runtime, TensorRT) are usable."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lad-fast", show_header=False)
    for key, value in backend_report().items():
        table.add_row(key, escape(value))  # "lad-fast[dicom]" is not rich markup
    Console().print(table)
