"""Kernel tests run the Triton path on CPU under the interpreter, and the real kernels on a GPU.

TRITON_INTERPRET must be set before triton is first imported: tests/conftest.py (loaded before this
file and before any test module) sets it when there is no CUDA device.
"""

from __future__ import annotations

import os
import sys

# Triton installs its interpreter hooks at import: setting the variable after that is too late.
_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# One tolerance table per dtype: the Triton result against the reference computed in float64 (fp32 and
# fp64 inputs) or in float32 (fp16 / bf16 inputs), as {dtype: (atol, rtol)}.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    """Compare ``actual`` with the high-precision ``expected`` using the table row of ``dtype``.

    ``scale`` widens both tolerances for quantities with longer reduction chains (e.g. gradients).
    """
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_ready() -> None:
    if _TOO_LATE and not torch.cuda.is_available():
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1: run "
            "tests/kernels in its own pytest process, or export TRITON_INTERPRET=1 before pytest starts"
        )


@pytest.fixture(autouse=True, scope="session")
def _no_tf32_on_cuda():
    """On a GPU the fp32 rows of the table are for full-precision products: the kernels and the
    references follow PyTorch's TF32 switches, which the test session turns off (and restores)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def close():
    """The tolerance-table comparison above, as a fixture (conftest modules cannot be imported)."""
    return assert_close


@pytest.fixture
def device() -> torch.device:
    """CUDA when there is one (the real kernels), else CPU (the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
