"""The CPU thread policy (lad_fast/utils/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lad_fast.errors import ConfigError
from lad_fast.utils.threads import affinity_cores, apply_thread_policy, chosen_threads, cpu_env, threads_for


def test_rule_follows_the_measurements():
    assert [threads_for(c) for c in (1, 2, 3, 4, 16)] == [1, 1, 2, 3, 15]


def test_affinity_is_what_the_process_may_run_on():
    assert affinity_cores() == len(os.sched_getaffinity(0))


def test_overrides_come_first():
    assert chosen_threads({}, cores=8) == 7
    assert chosen_threads({"OMP_NUM_THREADS": "3"}, cores=8) is None  # torch read it at load
    assert chosen_threads({"LAD_FAST_THREADS": "5", "OMP_NUM_THREADS": "3"}, cores=8) == 5
    assert chosen_threads({"LAD_FAST_THREADS": "torch"}, cores=8) is None


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_threads_variable_is_refused_with_the_fix(value):
    with pytest.raises(ConfigError, match=rf"LAD_FAST_THREADS='{value}': give a positive number.*'torch'"):
        chosen_threads({"LAD_FAST_THREADS": value})


def test_apply_sets_torch_threads_and_wait_policy_keeps_a_user_choice():
    before = torch.get_num_threads()
    try:
        assert apply_thread_policy({"LAD_FAST_THREADS": "1"}) == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        assert apply_thread_policy({"LAD_FAST_THREADS": "torch"}) == 2  # left alone
    finally:
        torch.set_num_threads(before)
    env: dict[str, str] = {}
    cpu_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpu_env(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_fresh_process_gets_the_rule_from_its_affinity():
    """A process without OMP_NUM_THREADS gets the rule's count for its affinity (torch's own default is
    the number of cores: 2 threads here, the slow case of issue 12)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LAD_FAST_THREADS")}
    code = (
        "from lad_fast.utils.threads import apply_thread_policy, affinity_cores; "
        "print(affinity_cores(), apply_thread_policy())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cores, threads = map(int, out.stdout.split())
    assert threads == threads_for(cores)
