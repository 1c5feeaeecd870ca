"""CPU threading side by side: torch's defaults against lad-fast's thread policy (lad_fast/utils/threads.py).

Each variant runs in a fresh process, because libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads:

- ``default``: what a new user gets from plain Python: torch's thread count (= cores), libgomp's spin-wait;
- ``passive``: torch's thread count, ``OMP_WAIT_POLICY=PASSIVE`` (what the CLI did before the policy);
- ``tuned``: the policy: threads from the CPU affinity (1 on two cores), PASSIVE.

Workloads, on the ``tiny`` preset's untrained networks (speed only): one denoiser step at the guided batch
(cond + null of one volume: batch 2), median of 20; and the generation of 2 volumes (default sampler:
Euler 30 steps, guidance 3, batch 1) with their decode, as ``lad-fast generate`` does it minus the files.
Variants run interleaved ``--repeats`` times; the best time of each is kept. Appends one JSON line to
``bench/results/threads.jsonl``.

    python bench/threads.py [--note "machine shared with ..."] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "default": {"LAD_FAST_THREADS": "torch"},
    "passive": {"LAD_FAST_THREADS": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "tuned": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def child() -> dict:
    import torch

    from lad_fast.utils.threads import apply_thread_policy

    threads = apply_thread_policy()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sampler import _conditions, _networks

    from lad_fast.diffusion.schedules import make_schedule
    from lad_fast.generate.generate import SamplerSettings, sample_latents

    cfg, vq, net, shape = _networks("tiny", torch.device("cpu"))
    conds = _conditions(net, shape, 2, torch.device("cpu"))
    x = torch.randn(2, *shape)
    t = torch.full((2,), 10.0)
    emb = net.embed_condition(conds["content"], conds["structure"])
    extra = [] if conds["spatial"] is None else [conds["spatial"]]
    step = []
    with torch.no_grad():
        for i in range(25):
            t0 = time.perf_counter()
            net(x, t, emb, *extra)
            if i >= 5:
                step.append(time.perf_counter() - t0)
    s = cfg.sampling
    settings = SamplerSettings(s.sampler, s.steps, s.guidance, None)
    sched = make_schedule(cfg.diffusion)
    t0 = time.perf_counter()
    for k in range(2):
        sl = slice(k, k + 1)
        sp = None if conds["spatial"] is None else conds["spatial"][sl]
        x0 = sample_latents(
            net, net, conds["content"][sl], conds["structure"][sl], [k], settings, spatial=sp, sched=sched,
            prediction=cfg.diffusion.prediction, shape=shape,
        )  # fmt: skip
        with torch.no_grad():
            vq.decode(vq.quantize(vq.from_unit(x0.clamp(-1, 1))))
    gen = time.perf_counter() - t0
    return {
        "torch_threads": threads,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default: spin)"),
        "step_s_median": round(statistics.median(step), 4),
        "generate_2_volumes_s": round(gen, 2),
    }


def _time_generate(run: str, n: int, env: dict[str, str]) -> float:
    """Seconds of ``lad-fast generate --run RUN --n N --device cpu`` into a fresh temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "lad_fast.cli.app", "generate", "--run", run, "--out", f"{tmp}/o"]
        cmd += ["--n", str(n), "--device", "cpu"]
        subprocess.run(cmd, env={**env, "LAD_FAST_QUIET": "1"}, capture_output=True, check=True)
        return round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--note", default="")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the variants (best time kept)")
    p.add_argument("--run", default=None, help="also time `lad-fast generate --n N` of this trained run")
    p.add_argument("--n", type=int, default=4, help="volumes generated with --run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child()))
        return 0
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LAD_FAST_THREADS")
    }
    load = round(os.getloadavg()[0], 2)
    rows: dict[str, dict] = {}
    for _ in range(args.repeats):  # interleaved, best of: the load of a shared machine drifts
        for name, extra in VARIANTS.items():
            cmd = [sys.executable, __file__, "--child"]
            out = subprocess.run(cmd, env={**base, **extra}, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if args.run:
                r["lad_fast_generate_s"] = _time_generate(args.run, args.n, {**base, **extra})
            old = rows.get(name)
            keys = [k for k in r if k.endswith("_s") or k.endswith("_s_median")]
            rows[name] = r if old is None else {**r, **{k: min(old[k], r[k]) for k in keys}}
    tuned = rows["tuned"]
    print(f"threads bench (tiny, untrained networks), {len(os.sched_getaffinity(0))} cores in the affinity")
    head = ("variant", 10), ("threads", 7), ("wait policy", 24), ("step s", 8), ("2 volumes s", 12)
    print(
        " ".join(f"{c:{'' if i == 0 else '>'}{w}}" for i, (c, w) in enumerate(head)) + "  tuned is x faster"
    )
    for name, r in rows.items():
        ratio = r["generate_2_volumes_s"] / tuned["generate_2_volumes_s"]
        r["tuned_speedup_generate"] = round(ratio, 2)
        r["tuned_speedup_step"] = round(r["step_s_median"] / tuned["step_s_median"], 2)
        print(
            f"{name:10} {r['torch_threads']:>7} {r['wait_policy']:>24} {r['step_s_median']:>8.4f} "
            f"{r['generate_2_volumes_s']:>12.2f} {ratio:>18.2f}"
            + (f"   lad-fast generate --n {args.n}: {r['lad_fast_generate_s']:.1f} s" if args.run else "")
        )
    if args.no_write:
        return 0
    import torch

    record = {
        "bench": "threads",
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores_affinity": len(os.sched_getaffinity(0)),
        "load_average_1min_at_start": load,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "networks": "tiny preset, untrained (speed only)",
        "note": args.note,
        "generate_run": args.run
        and {"run": args.run, "n": args.n, "command": "lad-fast generate --device cpu"},
        "repeats": args.repeats,
        "variants": rows,
    }
    from _common import append_result  # the sibling helper every bench script appends through

    print(f"appended to {append_result('threads', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
