"""Device choice (lad_fast.utils.devices): a pure function of the device string and torchrun's LOCAL_RANK."""

from __future__ import annotations

import pytest
import torch

from lad_fast.errors import ConfigError
from lad_fast.utils.devices import choose_device, resolve_device


def test_plain_choices_without_torchrun():
    assert choose_device("cpu", env={}) == "cpu"
    assert choose_device("cuda", env={}) == "cuda"
    assert choose_device("cuda:1", env={}) == "cuda:1"
    assert choose_device("auto", env={}, cuda_available=True) == "cuda"
    assert choose_device("auto", env={}, cuda_available=False) == "cpu"
    assert choose_device(torch.device("cpu"), env={}) == "cpu"


def test_each_torchrun_rank_takes_its_own_gpu():
    for local_rank in ("0", "1", "3"):
        env = {"LOCAL_RANK": local_rank, "RANK": local_rank, "WORLD_SIZE": "4"}
        assert choose_device("cuda", env=env) == f"cuda:{local_rank}"
        assert choose_device("auto", env=env, cuda_available=True) == f"cuda:{local_rank}"
        assert choose_device("cpu", env=env) == "cpu"  # gloo ranks share the CPU
        assert choose_device("auto", env=env, cuda_available=False) == "cpu"
    assert choose_device("cuda:1", env={"LOCAL_RANK": "1"}) == "cuda:1"


def test_refused_choices_say_what_to_do():
    with pytest.raises(ConfigError, match=r"device 'cuda:0' asked for, but torchrun gave this process "
                       r"LOCAL_RANK 1; pass --device cuda \(or auto\)"):  # fmt: skip
        choose_device("cuda:0", env={"LOCAL_RANK": "1"})
    with pytest.raises(ConfigError, match=r"unknown device 'gpu'; use auto, cpu, cuda or cuda:N"):
        choose_device("gpu", env={})
    with pytest.raises(ConfigError, match=r"LOCAL_RANK='x' is not an integer; launch with torchrun"):
        choose_device("cuda", env={"LOCAL_RANK": "x"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_resolving_a_missing_gpu_is_an_error():
    with pytest.raises(ConfigError, match=r"device 'cuda:1' asked for, but this machine has no usable CUDA"):
        resolve_device(choose_device("cuda", env={"LOCAL_RANK": "1"}))
