"""Everything a training run does before its first step, for every trainer alike.

:func:`open_run` chooses this process's device (:func:`lad_fast.utils.devices.choose_device`:
``cuda:LOCAL_RANK`` under torchrun), joins the process group, refuses a run that already holds a checkpoint
of the model (unless ``--resume`` or ``--force``) and verifies the checkpoint to resume, all before
anything is written; then it creates or reopens the run folder and, on ``--force``, deletes the old
checkpoints (rank 0, the other ranks wait). The :class:`Setup` it returns is what a trainer's ``build``
receives from :func:`lad_fast.train.loop.train`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from lad_fast.config import LadConfig
from lad_fast.errors import CheckpointError, OutputExistsError
from lad_fast.runs.checkpoints import Checkpoint, clean_leftovers, latest_step_dir, load_checkpoint
from lad_fast.runs.rundir import RunDir
from lad_fast.utils.devices import choose_device, resolve_device
from lad_fast.utils.distributed import DistInfo, init_distributed

T = TypeVar("T")


@dataclass(frozen=True)
class Setup:
    """What the loop hands a trainer's ``build``: where to build, and the two setup services it may need.

    run: the (created) run folder; device: this process's device (``cuda:LOCAL_RANK`` under torchrun);
    dist: rank, world size and local rank; seed: the training config's seed.
    """

    run: RunDir
    device: torch.device
    dist: DistInfo
    seed: int

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @contextlib.contextmanager
    def initial_weights(self) -> Iterator[None]:
        """Modules built inside draw their initial weights from torch's CPU stream seeded with ``seed``
        alone (on every rank the same), whatever was drawn before; the caller's CPU RNG state is restored
        on exit."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            yield

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the other ranks once rank 0 has returned: rank 0 writes a cache
        that the others then read (a plain call in a single process)."""
        if not self.dist.enabled:
            return fn()
        out = fn() if self.is_main else None
        torch.distributed.barrier()
        return out if self.is_main else fn()  # type: ignore[return-value]


def existing_checkpoint(
    model_dir: Path, model: str, *, resume: bool, force: bool, fallback: bool, data_hash: str | None
) -> tuple[bool, Checkpoint | None]:
    """(does ``model_dir`` hold a checkpoint, the verified one to resume). Reads only: every refusal
    happens before the run folder is created or its config rewritten."""
    if not model_dir.is_dir() or latest_step_dir(model_dir) is None:
        return False, None
    if not resume:
        if not force:
            raise OutputExistsError(
                f"{model_dir} already holds a {model} checkpoint; pass --resume to continue it or --force "
                "to start over (deleting it)"
            )
        return True, None
    ckpt = load_checkpoint(model_dir, model, fallback=fallback)
    stored = ckpt.meta.get("data_hash") if ckpt is not None else None
    if data_hash is not None and stored is not None and stored != data_hash:
        raise CheckpointError(
            f"cannot resume {ckpt.path}: it was trained on another dataset (data hash {stored[:12]}, this "
            f"data {data_hash[:12]}); resume with the original --data, or start a new --run"
        )
    return True, ckpt


def open_run(
    run: str | os.PathLike[str],
    config: LadConfig,
    model: str,
    seed: int,
    *,
    resume: bool = False,
    force: bool = False,
    fallback: bool = False,
    device: str | torch.device = "cpu",
    data_hash: str | None = None,
) -> tuple[Setup, Checkpoint | None]:
    """(the set-up run, the verified checkpoint to resume or None); see the module docstring and
    :func:`lad_fast.train.loop.train` for the arguments."""
    dev = resolve_device(choose_device(device))
    info = init_distributed(dev)
    model_dir = RunDir(run).model_dir(model)  # validates the name
    existing, ckpt = existing_checkpoint(
        model_dir, model, resume=resume, force=force, fallback=fallback, data_hash=data_hash
    )
    rundir = RunDir.create(run, config)
    if existing and not resume and info.is_main:
        rundir.clear_model(model)  # --force
    elif info.is_main:
        clean_leftovers(model_dir)  # a killed checkpoint write's temporaries (the folder lock is held)
    if info.enabled:
        torch.distributed.barrier()
    return Setup(run=rundir, device=dev, dist=info, seed=seed), ckpt
