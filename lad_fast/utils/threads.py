"""CPU thread policy: how many torch threads, and whether idle OpenMP threads spin or sleep.

Chosen from the cores this process may run on (``os.sched_getaffinity``, which respects ``taskset``,
cgroups' cpusets and container limits, unlike ``os.cpu_count``), by measurement on the two-core
development machine (``bench/threads.py``; the numbers are in ``bench/results/threads.jsonl``):

- a ``tiny`` denoiser step took 0.72 s with torch's default (2 threads, libgomp spinning idle threads),
  0.034 s with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``, 0.022 s with 1 thread (issue 12). Again here,
  with other jobs loading the two cores (load average ~10; ``bench/threads.py``, best of 2 interleaved):
  default 0.88 s per step and 51.6 s for 2 tiny volumes, PASSIVE with 2 threads 0.022 s / 2.09 s,
  1 thread 0.027 s / 1.90 s; ``lad-fast generate --n 2`` of the trained main job 16.1 / 18.4 / 16.5 s
  (the CLI already set PASSIVE). Spinning is the big loss; between 1 and 2 sleeping threads the
  difference is within the noise of a shared machine, and a second thread competes with the pipelined
  generator's writer thread for the second core. So: **1 thread on 1 or 2 cores**.
- on more cores, ``cores - 1`` threads: one core is left to the pipelined generator's writer thread
  (gzip) and the data loader. That rule is not measured here (no machine with more cores was
  available); override it as below where it does not fit.
- wait policy **PASSIVE** always (idle threads sleep): spinning never won a measurement here, and it
  costs the most exactly when the machine is shared. It must be in the environment before torch (and
  libgomp) load: the CLI sets it first thing (``lad_fast.cli.app.cpu_wait_policy``; :func:`cpu_env` does
  the same for scripts); a library user sets it themselves.

Overrides, strongest first: ``LAD_FAST_THREADS=N`` (or ``=torch``: leave torch's own choice),
then ``OMP_NUM_THREADS`` (when set, torch already uses it and nothing is changed), then the rule.
``N`` above the usable cores is clamped to them with a one-line warning: more threads than cores never
run faster, and tens of thousands crash or hang OpenMP.
``generate`` and ``train`` call :func:`apply_thread_policy`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, MutableMapping

from lad_fast.errors import ConfigError

THREADS_ENV = "LAD_FAST_THREADS"


def affinity_cores() -> int:
    """Number of CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_for(cores: int) -> int:
    """The rule: 1 thread on 1 or 2 cores (measured), ``cores - 1`` above (one core for the writer)."""
    return 1 if cores <= 2 else cores - 1


class ThreadsClampedWarning(UserWarning):
    """``LAD_FAST_THREADS`` asked for more threads than this process has cores; the core count is used."""


def chosen_threads(env: Mapping[str, str] | None = None, cores: int | None = None) -> int | None:
    """Torch thread count for this process, or None to leave torch's own (``LAD_FAST_THREADS=torch``, or
    ``OMP_NUM_THREADS`` set: torch read it at load). ``cores``: the usable cores (default: the affinity
    mask's). Raises ConfigError for a bad ``LAD_FAST_THREADS``; one above ``cores`` is clamped to it with
    a :class:`ThreadsClampedWarning`."""
    env = os.environ if env is None else env
    cores = affinity_cores() if cores is None else cores
    value = env.get(THREADS_ENV, "").strip()
    if value == "torch":
        return None
    if value:
        digits = value.lstrip("0")
        if not (value.isascii() and value.isdigit()) or not digits:
            raise ConfigError(
                f"{THREADS_ENV}={value!r}: give a positive number of threads, or 'torch' for torch's default"
            )
        if len(digits) > 18 or int(digits) > cores:  # int() of thousands of digits is refused by Python
            shown = value if len(value) <= 18 else f"{value[:18]}..."
            warnings.warn(
                f"{THREADS_ENV}={shown} is more than the {cores} cores this process may run on; "
                f"using {cores}",
                ThreadsClampedWarning,
                stacklevel=2,
            )
            return cores
        return int(digits)
    if env.get("OMP_NUM_THREADS", "").strip():
        return None
    return threads_for(cores)


def cpu_env(env: MutableMapping[str, str] | None = None) -> None:
    """Set the OpenMP wait policy to PASSIVE unless the user chose one. Call before torch is imported."""
    env = os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def apply_thread_policy(env: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op thread count by :func:`chosen_threads`; returns the count in use."""
    import torch

    n = chosen_threads(env)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
