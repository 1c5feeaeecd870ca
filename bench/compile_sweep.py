"""Compile every Triton kernel config ahead of time for each GPU target and tabulate its resources.

    python bench/compile_sweep.py [--subset all|frontier] [--targets ...] [--kernels ...] [--paths ...]
                                  [--presets ...] [--workers N] [--max-minutes M] [--out STEM]
        the kernels' configs at the shapes the presets' models launch in training, recorded on meta
        tensors (lad_fast.models.kernel_calls), for each target; ``all``: every config each kernel's
        prune keeps for the target (about 3,000 compiles for sm_80, sm_90 and sm_100); ``frontier``:
        per kernel, dtype path and target the configs no other one dominates (the largest tiles and
        stages, where the limits bind; about 380). No compile starts after --max-minutes. Writes
        STEM.json (versions, machine, one record per compile and line) and STEM.md (kernel x dtype path x
        target: configs, max shared memory against the limit, max registers, spills, tensor-core
        instructions); STEM is bench/results/compile_sweep unless --out names another. Exit status 1
        when any config has a problem (compile error, shared memory over the limit, spills over the
        bound, a tensor-core dot without tensor-core instructions).
    python bench/compile_sweep.py --device [--tiny]
        bench/gpu_suite.sh's step: the CI subset compiled for this machine's GPU (its architecture and its
        own shared-memory limit), each binary then loaded on the GPU, whose driver reports registers and
        spills and accepts or refuses the shared memory; prints a table, writes nothing. Without a GPU
        (the suite's --cpu-dry-run) it compiles for sm_90 from the table; --tiny: vq_nearest's fp32 (TF32)
        pass at the tiny preset only.

Compiling needs Triton without its interpreter: under TRITON_INTERPRET=1 the script re-runs itself
without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    import torch
    import triton

    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _spill(r: dict) -> int:
    return max(r["spill_stores"] or 0, r["spill_loads"] or 0)


def table(records: list[dict]) -> list[str]:
    """Markdown rows: kernel x dtype path x target."""
    from lad_fast.kernels import _limits

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["kernel"], r["path"], r["target"])].append(r)
    rows = [
        "| kernel | dtype path | target | configs | errors | max shared (limit) B | max regs | "
        "spilling configs | max spill B | tensor-core instructions | problems |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for (kernel, path, target), rs in sorted(groups.items()):
        ok = [r for r in rs if not r["error"]]
        limit = _limits.TARGETS[target].smem_per_block
        shared = max((r["shared"] for r in ok), default=0)
        regs = max((r["registers"] for r in ok), default=0)
        spilling = [r for r in ok if _spill(r)]
        kinds = sorted({k.split(".")[0] for r in ok for k in r["tensor_core"]})
        expected = any(r["tensor_core_expected"] for r in rs)
        tc = ", ".join(kinds) if kinds else ("MISSING" if expected else "- (none expected)")
        bad = sum(1 for r in rs if r["problems"])
        rows.append(
            f"| {kernel} | {path} | {target} | {len(rs)} | {len(rs) - len(ok)} | {shared:,} ({limit:,}) | "
            f"{regs} | {len(spilling)} | {max(map(_spill, ok), default=0):,} | {tc} | {bad} |"
        )
    return rows


def write(result: dict, args: argparse.Namespace, seconds: float) -> None:
    from lad_fast.kernels import _limits

    records, info = result["records"], machine()
    errors = [r for r in records if r["error"]]
    bad = [r for r in records if r["problems"]]
    by_target = defaultdict(list)
    for r in records:
        by_target[r["target"]].append(r)
    head = {
        "machine": info, "seconds": round(seconds), "workers": args.workers, "timeout_s": args.timeout,
        "subset": args.subset, "max_minutes": args.max_minutes, "presets": args.presets, "paths": args.paths,
        "kernels": args.kernels or "all",
        "targets": {t: {"arch": _limits.TARGETS[t].arch, "smem_per_block": _limits.TARGETS[t].smem_per_block}
                    for t in args.targets},
        "max_spill_bytes": _limits.MAX_SPILL_BYTES, "planned": result["planned"], "compiles": len(records),
        "errors": len(errors), "with_problems": len(bad),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one record per line: a file that reads and diffs by compile
    per_line = [json.dumps(r, default=str) for r in records]
    body = (
        json.dumps(head, indent=1, default=str)[:-2]
        + ',\n "records": [\n  '
        + ",\n  ".join(per_line)
        + "\n ]\n}\n"
    )
    out.with_suffix(".json").write_text(body)
    subset = {
        "all": "every autotune config that the kernel's own prune keeps for the target",
        "frontier": "the frontier of the configs that the kernel's own prune keeps for the target: per "
        "kernel, dtype path and target, each config that no other one dominates (every block at least as "
        "large, at least as many stages, at most as many warps), the ones with the most shared memory and "
        "registers per thread",
    }[args.subset]
    cut = result["planned"] - len(records)
    lines = [
        "# Ahead-of-time compile sweep",
        "",
        f"`python bench/compile_sweep.py --subset {args.subset}` on {info['cores']} {info['cpu']} cores "
        f"(no GPU), {info['when']}: torch {info['torch']}, triton {info['triton']}, Python {info['python']}; "
        f"{len(records)} of {result['planned']} planned compiles in {seconds / 60:.0f} min "
        f"({args.workers} worker(s))"
        + (f", {cut} not started within --max-minutes {args.max_minutes}." if cut else "."),
        "",
        f"Compiled: {subset}, at the shapes the models of {', '.join(f'`{p}`' for p in args.presets)} launch "
        "in one training forward and backward (recorded on meta tensors by `lad_fast.models.kernel_calls`, "
        "not derived), for the dtype paths "
        f"{', '.join(args.paths)}; one compile per config with its heaviest launch variant "
        "(`lad_fast/kernels/aot.py`). Shared memory is what a launch requests (Triton's metadata), registers "
        "from `cuobjdump --dump-resource-usage`, spills from ptxas' `-v` report (bytes per thread), "
        f"tensor-core instructions counted in the PTX. Spill bound: {_limits.MAX_SPILL_BYTES} B per thread.",
        "",
        "| target | compiles | errors | max shared (limit) B | max regs | configs spilling | max spill B | "
        "problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, rs in sorted(by_target.items()):
        ok = [r for r in rs if not r["error"]]
        lines.append(
            f"| {t} | {len(rs)} | {len(rs) - len(ok)} | {max((r['shared'] for r in ok), default=0):,} "
            f"({_limits.TARGETS[t].smem_per_block:,}) | {max((r['registers'] for r in ok), default=0)} | "
            f"{sum(1 for r in ok if _spill(r))} | {max(map(_spill, ok), default=0):,} | "
            f"{sum(1 for r in rs if r['problems'])} |"
        )
    lines += ["", *table(records), ""]
    if bad:
        lines += ["## Problems", ""]
        lines += [
            f"- {r['kernel']} {r['path']} {r['target']} {r['config']}: {'; '.join(r['problems'])}"
            for r in bad
        ]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def _calls(presets) -> dict:
    from lad_fast.models.kernel_calls import kernel_calls

    return {p: kernel_calls(p) for p in presets}


def device_check(args: argparse.Namespace) -> int:
    """The CI subset for this machine's GPU, each binary loaded there; without a GPU, sm_90 from the table."""
    import torch

    from lad_fast.kernels import _limits, aot

    if torch.cuda.is_available():
        target = _limits.cuda_target(torch.cuda.current_device())
        name = f"sm_{target.arch}"
        _limits.TARGETS[name] = target  # the device's own limit, not the table's
    else:
        print("compile_sweep --device: no CUDA device here; compiling for sm_90 from the table")
        name = "sm_90"
    kernels = {"_vq_nearest_kernel"} if args.tiny else None
    presets = ("tiny",) if args.tiny else aot.PRESETS
    paths = ("fp32-tf32",) if args.tiny else aot.PATHS  # --tiny: vq_nearest's default fp32 pass alone
    t0 = time.perf_counter()
    result = aot.check(_calls(presets), paths, [name], "ci", args.workers, args.timeout, kernels=kernels,
                       keep_binary=torch.cuda.is_available())  # fmt: skip
    records = result["records"]
    if torch.cuda.is_available():
        aot.load_on_device(records)
    for r in records:
        print(aot.summary_line(r), *(f"  PROBLEM: {p}" for p in r["problems"]), sep="\n")
    bad = sum(1 for r in records if r["problems"])
    print(
        f"{len(records)} configs compiled for {name} in {time.perf_counter() - t0:.0f} s, {bad} with problems"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # compiling needs the real @triton.jit: start again
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    from lad_fast.kernels import _limits, aot

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", default="all", choices=("all", "frontier"))
    parser.add_argument("--targets", nargs="+", default=list(_limits.TARGETS), choices=list(_limits.TARGETS))
    parser.add_argument("--presets", nargs="+", default=list(aot.PRESETS), choices=aot.PRESETS)
    parser.add_argument("--paths", nargs="+", default=list(aot.PATHS), choices=aot.PATHS)
    parser.add_argument("--kernels", nargs="+", help="only these @triton.jit kernels (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="compile processes (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per compile")
    parser.add_argument("--max-minutes", type=float, help="start no compile after this many minutes")
    parser.add_argument(
        "--out", default=str(RESULTS / "compile_sweep"), help="results stem: STEM.json and STEM.md"
    )
    parser.add_argument("--device", action="store_true", help="the GPU suite's check (see above)")
    parser.add_argument(
        "--tiny", action="store_true", help="with --device: vq_nearest's fp32 pass at tiny only"
    )
    args = parser.parse_args(argv)
    if args.device:
        if args.workers == 1:
            args.workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        return device_check(args)

    t0 = time.perf_counter()

    def progress(rec: dict, i: int, n: int) -> None:
        print(f"[{i}/{n} {time.perf_counter() - t0:.0f}s] {aot.summary_line(rec)}", flush=True)

    max_seconds = None if args.max_minutes is None else 60 * args.max_minutes
    kernels = set(args.kernels) if args.kernels else None
    result = aot.check(
        _calls(args.presets), args.paths, args.targets, args.subset, args.workers, args.timeout, progress,
        kernels, max_seconds=max_seconds,
    )  # fmt: skip
    write(result, args, time.perf_counter() - t0)
    records = result["records"]
    bad = [r for r in records if r["problems"]]
    errors = sum(1 for r in records if r["error"])
    print(
        f"{len(records)} of {result['planned']} planned compiles, {errors} errors, {len(bad)} with "
        f"problems; {Path(args.out).with_suffix('.md')}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
