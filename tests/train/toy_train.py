"""A toy model trained through lad_fast.train.loop: imported by the tests and run as a worker process.

As a script (the SIGKILL, SIGINT / SIGTERM and DDP tests)::

    python tests/train/toy_train.py RUN --steps 40 [--resume] [--stop-at N] [--sleep 0.02] [--out weights.pt]

``--out`` writes the final weights of this rank to ``<out>.rank<r>.pt`` and what the loop set up for it
(rank, local rank, world, device) to ``<out>.rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lad_fast.config import TrainConfig, get_preset
from lad_fast.train.loop import Job, Phase, Setup, TrainResult, train
from lad_fast.utils.devices import choose_device
from lad_fast.utils.distributed import step_generator
from lad_fast.utils.interrupts import Interrupted

SHAPE = (1, 4, 6, 6)  # (C, D, H, W) of one toy volume


class ToyNet(nn.Module):
    """Conv3d -> GELU -> Dropout -> Conv3d: dropout makes the result depend on the torch RNG stream."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, width, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.b = nn.Conv3d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(F.gelu(self.a(x))))


def target(x: torch.Tensor) -> torch.Tensor:
    """What the toy learns: a fixed local smoothing of its input."""
    return 0.5 * x + 0.25 * (x.roll(1, dims=-1) + x.roll(-1, dims=-2))


class ToyBatches:
    """``(step, rank, world) -> (B, C, D, H, W)`` drawn from a generator seeded by (seed, step, rank)."""

    def __init__(self, seed: int, batch_size: int, sleep: float = 0.0) -> None:
        self.seed, self.batch_size, self.sleep = seed, batch_size, sleep

    def __call__(self, step: int, rank: int, world: int) -> torch.Tensor:
        if self.sleep:
            time.sleep(self.sleep)  # widens the window in which the SIGKILL test strikes
        return torch.randn(self.batch_size, *SHAPE, generator=step_generator(self.seed, step, rank))


def toy_cfg(**changes: Any) -> TrainConfig:
    base = TrainConfig(
        steps=30,
        batch_size=4,
        lr=1e-2,
        betas=(0.9, 0.99),
        grad_clip=1.0,
        compile=False,
        log_every=5,
        checkpoint_every=10,
        preview_every=0,
        max_bad_steps=3,
        seed=0,
    )
    return replace(base, **changes)


def run_toy(
    run_path: str | Path,
    cfg: TrainConfig,
    *,
    width: int = 4,
    resume: bool = False,
    force: bool = False,
    stop_at: int | None = None,
    sleep: float = 0.0,
    bad_steps: dict[int, str] | None = None,
    preview: Any = None,
    fallback: bool = False,
    report: str | Path | None = None,
) -> tuple[ToyNet, TrainResult]:
    """Build, optionally resume, and train the toy. ``bad_steps`` maps a 0-based step to "loss" or "grad"
    to inject a non-finite loss or gradient there. ``report``: write what the loop set up for this rank
    (rank, local rank, world, device, the device ``--device cuda`` would give) to
    ``<report>.rank<r>.json``."""
    bad = bad_steps or {}
    nets: list[ToyNet] = []  # the net built by ``build``, returned to the caller

    def build(setup: Setup) -> Job:
        with setup.initial_weights():
            net = ToyNet(width).to(setup.device)
        nets.append(net)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))

        def loss_fn(mods, x, step):
            loss = F.mse_loss(mods["model"](x), target(x))
            if bad.get(step) == "loss":
                loss = loss * math.nan
            elif bad.get(step) == "grad":  # finite value, infinite gradient: d sqrt(z)/dz at z = 0
                w = net.b.weight
                loss = loss + torch.sqrt((w - w.detach()).sum())
            return loss, {"mse": loss.detach()}

        if report is not None:
            info = {
                "rank": setup.dist.rank,
                "local_rank": setup.dist.local_rank,
                "world": setup.dist.world,
                "device": str(setup.device),
                # What this process would take for --device cuda (torchrun's LOCAL_RANK, no GPU needed).
                "cuda_choice": choose_device("cuda"),
            }
            Path(f"{report}.rank{setup.dist.rank}.json").write_text(json.dumps(info))
        return Job(
            {"model": net},
            [Phase("model", opt, loss_fn, scheduler=sched)],
            ToyBatches(cfg.seed, cfg.batch_size, sleep),
            model_config={"width": width, "kind": "toy"},
            meta={"data_hash": "toy", "latent_scale": 1.0},
            preview=preview,
        )

    result = train(
        run_path,
        get_preset("tiny"),
        "segmenter",
        cfg,
        build,
        resume=resume,
        force=force,
        stop_at=stop_at,
        fallback=fallback,
    )
    return nets[0], result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = toy_cfg(steps=a.steps, checkpoint_every=a.checkpoint_every, ema_decay=0.9)
    try:
        net, _ = run_toy(a.run, cfg, resume=a.resume, sleep=a.sleep, stop_at=a.stop_at, report=a.out)
    except Interrupted as err:  # what the CLI does with it (lad_fast.cli.app.main)
        print(f"lad-fast: {err}", flush=True)
        raise SystemExit(err.exit_code) from None
    if a.out:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(net.state_dict(), f"{a.out}.rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears the group down while another still talks on it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
