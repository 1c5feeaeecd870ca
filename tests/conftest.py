"""Shared fixtures. ``shared`` is ../shared/data beside the project (read-only sample data): tests that
read it skip without it, but fail under ``CI=true`` (see :func:`_shared.shared_data`)."""

from __future__ import annotations

import os
from pathlib import Path

# Without a GPU the Triton kernels run under the interpreter. The variable must be set before triton is
# first imported, so it is set here, when pytest loads this file, before any test module is collected.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import signal

import pytest
from _shared import shared_data

# A test run started in the background by a script (`cmd &`) inherits SIGINT ignored, and lad-fast keeps an
# ignored signal ignored, as Python does: the tests that send SIGINT then see nothing. They test what an
# interactive shell or a scheduler gives, so they get Python's own handler back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_data(SHARED / "data")


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """A prepared dataset of three tiny phantoms, generated once per test session. Read-only: tests
    that write masks or indexes copy it first."""
    from lad_fast.data.cache import phantom_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        return phantom_dataset("tiny", n=3)
