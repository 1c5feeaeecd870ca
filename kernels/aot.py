"""Ahead-of-time compile check of every Triton kernel in ``lad_fast.kernels`` (no GPU needed).

Each step runs the project's own code, so the check sees what a GPU run compiles:

1. ``record_op_calls(runs)``: the ``lad_fast::*`` op calls that some model code makes, **recorded** with a
   dispatch hook while it runs on *meta* tensors (shapes only, no data: seconds even for ``lad``);
   ``_dispatch.meta_as_cuda`` makes the public ops take their Triton path for meta tensors as they do for
   CUDA ones. The presets' training forward and backward are ``lad_fast.models.kernel_calls`` (models sit
   above kernels, so they are recorded there); nothing about shapes is derived by hand.
2. ``kernel_launches(calls, path)``: every call replayed through the op's host code (the ``_<op>_impl``
   functions the custom ops wrap) on meta tensors of a dtype path, each Triton kernel handle replaced by a
   recorder: kernel, arguments and constexprs of every launch, forward and backward. ``PATHS``: fp32 with
   torch.backends' TF32 switches off and on (the launchers follow them), fp16, bf16. vq_nearest is fp32
   in the models; its fp16 / bf16 paths replay the same call with cast inputs.
3. ``plan``: for every launch, the configs its kernel's own prune keeps for a target, given that target's
   limits (``_limits.TARGETS``); one job per kernel, product path, target and config, compiled with the
   heaviest launch variant that picks it (``_aot_compile``: Triton's binder, ``triton.compile`` for a
   ``GPUTarget``, resources from cuobjdump and ptxas, tensor-core instructions from the PTX).

``problems(record)`` says what is wrong with one compiled config: a compile error, shared memory above the
target's per-block limit, register spills above ``_limits.MAX_SPILL_BYTES``, or a tensor-core ``tl.dot``
path (fp16, bf16, TF32) without tensor-core instructions. Steps 2 and 3 need Triton without its
interpreter (under ``TRITON_INTERPRET=1`` every ``@triton.jit`` is interpreted and the launchers take
their interpreter branches): ``check()`` runs them in a subprocess when this process has it, as the
kernel tests do. The command lines are ``bench/compile_sweep.py`` and tests/kernels/test_compile_aot.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lad_fast.errors import BackendUnavailableError, ConfigError
from lad_fast.kernels import _limits
from lad_fast.kernels._aot_compile import (
    CompilePool,
    Job,
    TensorSpec,
    compile_all,
    jit_function,
    load_on_device,
    materialise,
)
from lad_fast.kernels._dispatch import TRITON_INSTALL, triton_available
from lad_fast.kernels._limits import Target

__all__ = [
    "OpCall", "check", "ci_subset", "frontier", "kernel_launches", "kernel_names", "load_on_device", "plan",
    "problems", "record_op_calls", "summary_line",
]  # fmt: skip

PRESETS = ("tiny", "lad", "lad-official")  # the presets whose models the check compiles for
CI_TARGETS = ("sm_80", "sm_90")  # the CI test's; the sweep adds sm_100
SUBSETS = ("all", "frontier", "ci")
PATHS = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")  # dtype paths: fp32 with TF32 off / on, fp16, bf16
DOT_PATHS = PATHS  # the product paths of a dot kernel's records (see _product_path): the same four
_PATH_DTYPE = {
    "fp32-ieee": torch.float32,
    "fp32-tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# The private modules that hold the @triton.jit kernels; every kernel in them must be launched by some op.
KERNEL_MODULES = (
    "lad_fast.kernels._conv3d_triton",
    "lad_fast.kernels._conv3d_bwd_triton",
    "lad_fast.kernels._attention_triton",
    "lad_fast.kernels._vq_triton",
)
# op name -> (module, the host function its custom op wraps)
_OP_IMPLS = {
    "conv3d": ("lad_fast.kernels.conv3d", "_conv3d_impl"),
    "conv3d_bwd": ("lad_fast.kernels.conv3d", "_conv3d_bwd_impl"),
    "norm_act_conv3d": ("lad_fast.kernels.conv3d", "_norm_act_conv3d_impl"),
    "norm_act_conv3d_bwd": ("lad_fast.kernels.conv3d", "_norm_act_bwd_impl"),
    "attention_fwd": ("lad_fast.kernels.attention", "_attention_fwd_impl"),
    "attention_bwd": ("lad_fast.kernels.attention", "_attention_bwd_impl"),
    "vq_nearest": ("lad_fast.kernels.vq_nearest", "_vq_nearest_impl"),
}
_FIXED_DTYPE = {("attention_bwd", 5)}  # (op, argument) that keeps its dtype on every path: the fp32 LSE
# Constexprs that choose how products are computed: each value is its own job. Other flags (NORM, HAS_RES,
# kernel geometry) add prologue, epilogue or index code: the heaviest variant stands for the others.
PATH_FLAGS = ("IEEE", "FAST", "GATHER")


# ------------------------------------------------------------------------------------- 1. op calls


@dataclasses.dataclass(frozen=True)
class OpCall:
    op: str  # "conv3d", "attention_bwd", ...
    args: tuple  # TensorSpec for tensors, plain values otherwise (lists as tuples)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec.of(value)
    if isinstance(value, list | tuple):
        return tuple(_spec(v) for v in value)
    return value


def record_op_calls(runs: Iterable[Callable[[], None]]) -> list[OpCall]:
    """The distinct ``lad_fast::*`` op calls that ``runs`` make on meta tensors, in order. Each run builds
    its own meta tensors (``lad_fast.models.kernel_calls.training_runs``: a preset's models)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lad_fast.kernels._dispatch import meta_as_cuda

    calls: dict[OpCall, None] = {}

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "lad_fast":
                calls[OpCall(func._opname, _spec(args))] = None
            return func(*args, **(kwargs or {}))

    for run in runs:
        with meta_as_cuda(), _Recorder():
            run()
    return list(calls)


# -------------------------------------------------------------------------------------- 2. launches


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch made by a host function."""

    module: str
    handle: str  # attribute of module: an @triton.jit function or its autotuner
    kernel: str  # the @triton.jit function's name
    args: tuple  # as launched, TensorSpec for tensors
    kwargs: tuple  # sorted (name, value): constexprs and launch options


def _kernel_handles(module) -> dict[str, Any]:
    """The module's kernel handles: @triton.jit functions (interpreted ones too) and their autotuners."""
    from triton.runtime.jit import KernelInterface

    return {n: h for n, h in vars(module).items() if isinstance(h, KernelInterface)}


def kernel_names() -> set[str]:
    """The name of every @triton.jit kernel in ``KERNEL_MODULES``."""
    return {
        jit_function(h).__name__
        for m in KERNEL_MODULES
        for h in _kernel_handles(importlib.import_module(m)).values()
    }


class _LaunchRecorder:
    """Stands in for a kernel handle: ``handle[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, module: str, name: str, handle, sink: list[Launch]) -> None:
        self.module, self.name, self.kernel, self.sink = module, name, jit_function(handle).__name__, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            item = Launch(
                self.module, self.name, self.kernel, _spec(args), tuple(sorted(_spec(kwargs).items()))
            )
            self.sink.append(item)

        return launch


@contextlib.contextmanager
def _recording_launches(sink: list[Launch]) -> Iterator[None]:
    patched = []
    try:
        for mod_name in KERNEL_MODULES:
            mod = importlib.import_module(mod_name)
            for name, handle in _kernel_handles(mod).items():
                patched.append((mod, name, handle))
                setattr(mod, name, _LaunchRecorder(mod_name, name, handle, sink))
        yield
    finally:
        for mod, name, handle in patched:
            setattr(mod, name, handle)


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _call_args(call: OpCall, dtype: torch.dtype) -> list[Any]:
    out = []
    for i, a in enumerate(call.args):
        if isinstance(a, TensorSpec):
            cast = getattr(torch, a.dtype).is_floating_point and (call.op, i) not in _FIXED_DTYPE
            out.append(a.meta(dtype if cast else None))
        else:
            out.append(list(a) if isinstance(a, tuple) else a)
    return out


def kernel_launches(calls: Iterable[OpCall], path: str) -> list[Launch]:
    """Every kernel launch the host code makes for these op calls on dtype path ``path`` (meta tensors)."""
    _require_compiler()
    sink: list[Launch] = []
    with _recording_launches(sink), _tf32(path == "fp32-tf32"), torch.no_grad():
        for call in calls:
            mod_name, fn_name = _OP_IMPLS[call.op]
            getattr(importlib.import_module(mod_name), fn_name)(*_call_args(call, _PATH_DTYPE[path]))
    return list(dict.fromkeys(sink))


# ------------------------------------------------------------------------------------------ 3. plan


def _configs_for(launch: Launch, target: Target) -> list[dict]:
    """The configs a launch can run with on ``target``: those its autotuner's prune keeps there (given
    the target), or the launch's own tile sizes and options for a kernel launched without autotuning."""
    from triton.runtime.autotuner import Autotuner

    handle = getattr(importlib.import_module(launch.module), launch.handle)
    kwargs = dict(launch.kwargs)
    if not isinstance(handle, Autotuner):
        tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        return [{**tiles, "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}]
    # positional arguments by name, as the autotuner binds them (constexprs arrive as kwargs)
    nargs = dict(zip(handle.arg_names, materialise(launch.args), strict=False))
    configs = handle.configs
    if handle.early_config_prune is not None:
        configs = handle.early_config_prune(configs, nargs, target=target, **kwargs)
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def _product_path(launch: Launch) -> str:
    """How a launch computes its products: "fp16", "bf16", or for fp32 "fp32-ieee" (FMA) / "fp32-tf32"
    in a kernel with the IEEE constexpr and "fp32" in one without a dot. Dtype paths that launch the same
    binary (the two fp32 paths of a kernel without a dot, vq_nearest's passes) share one job."""
    dtype = next(a.dtype for a in launch.args if isinstance(a, TensorSpec))
    name = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    ieee = dict(launch.kwargs).get("IEEE")
    return name if name != "fp32" or ieee is None else ("fp32-ieee" if ieee else "fp32-tf32")


def _weight(launch: Launch) -> tuple[int, ...]:
    """How much a launch variant needs: NORM first (its prologue loads fp32 tiles in the loop), then its
    other true flags (HAS_RES, ...), taps and strides (index arithmetic)."""
    kw = dict(launch.kwargs)
    taps = kw.get("KD", 1) * kw.get("KH", 1) * kw.get("KW", 1)
    strides = kw.get("SD", 1) * kw.get("SH", 1) * kw.get("SW", 1)
    return (kw.get("NORM") is True, sum(v is True for v in kw.values()), taps, strides)


@dataclasses.dataclass
class Planned:
    """A job and what it stands for: the presets whose models launch its config, and how many launch
    variants (shapes and flags that Triton specialises apart) pick that config."""

    job: Job
    presets: list[str]
    variants: int


def plan(
    calls: Mapping[str, list[OpCall]], paths: Iterable[str] = PATHS,
    targets: Iterable[Target] = tuple(_limits.TARGETS.values()), kernels: set[str] | None = None,
) -> list[Planned]:  # fmt: skip
    """One job per kernel, product path, target and config that the kernel's prune keeps on that target for
    some launch of these op calls (``calls``: per preset, ``record_op_calls``; ``kernels``: only these).

    Each config compiles once, with the heaviest launch variant that picks it: registers and shared memory
    follow from the tiles, stages and dtype, and the variants of a config differ in index arithmetic and
    epilogues. Raises when a kernel of ``KERNEL_MODULES`` is never launched (the check would not see it)."""
    _require_compiler()
    launches: dict[tuple[str, Launch], set[str]] = {}
    for preset, preset_calls in calls.items():
        for path in paths:
            for launch in kernel_launches(preset_calls, path):
                launches.setdefault((path, launch), set()).add(preset)
    if kernels is None:
        check_coverage({launch.kernel for _, launch in launches})
    groups: dict[tuple, list[tuple[Launch, set[str]]]] = {}
    for target in targets:
        for (_, launch), presets_of in launches.items():
            if kernels is not None and launch.kernel not in kernels:
                continue
            flags = tuple((k, v) for k, v in launch.kwargs if k in PATH_FLAGS)
            for config in _configs_for(launch, target):
                cfg = tuple(sorted(config.items()))
                key = (launch.module, launch.handle, _product_path(launch), target.arch, cfg, flags)
                groups.setdefault(key, []).append((launch, presets_of))
    planned = []
    for (module, handle, path, arch, config, _), items in groups.items():
        launch = max((lc for lc, _ in items), key=_weight)
        kwargs = tuple(sorted({**dict(launch.kwargs), **dict(config)}.items()))
        job = Job(module, handle, launch.kernel, path, arch, launch.args, kwargs, config)
        presets_of = sorted(set().union(*(p for _, p in items)))
        planned.append(Planned(job, presets_of, len({lc for lc, _ in items})))
    return planned


def check_coverage(launched: set[str]) -> None:
    """Raise unless every kernel of ``KERNEL_MODULES`` is among ``launched`` (a kernel that no recorded
    call launches would never be compiled, so never checked)."""
    missing = kernel_names() - launched
    if missing:
        raise ConfigError(
            f"the AOT check would not compile {', '.join(sorted(missing))}: no recorded op call launches "
            "it; record the model calls that do (lad_fast.models.kernel_calls) or remove the kernel"
        )


def _tiles(item: Planned) -> tuple[dict[str, int], int, int]:
    config = dict(item.job.config)
    blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
    return blocks, config["num_stages"], config["num_warps"]


def frontier(planned: list[Planned]) -> list[Planned]:
    """The configs that no other config of their (kernel, product path, target, path flags) dominates: none
    with every block at least as large, at least as many stages and at most as many warps. A dominated
    config needs no more shared memory (tiles times stages) and no more registers per thread (tile over
    warps), so the frontier holds the configs where the limits bind; the sweep's affordable subset."""
    groups: dict[tuple, list[Planned]] = {}
    for item in planned:
        flags = tuple((k, v) for k, v in item.job.kwargs if k in PATH_FLAGS)
        groups.setdefault((item.job.kernel, item.job.path, item.job.arch, flags), []).append(item)

    def dominated(a: Planned, b: Planned) -> bool:
        (ta, sa, wa), (tb, sb, wb) = _tiles(a), _tiles(b)
        return (ta, sa, wa) != (tb, sb, wb) and all(ta[k] <= tb[k] for k in ta) and sa <= sb and wa >= wb

    keep = {id(a) for g in groups.values() for a in g if not any(dominated(a, b) for b in g)}
    return [item for item in planned if id(item) in keep]


def ci_subset(planned: list[Planned]) -> list[Planned]:
    """A representative subset (the CI test): every kernel, every dtype path and every target.

    Each dot kernel compiles on every target with its product path rotating over kernels and targets, so
    that every path meets every target; vq_nearest's TF32 pass (FAST=True, its default for fp32) on every
    target; each kernel without a dot once, targets and dtypes rotating. For a (kernel, path, target), the
    config with the largest tiles that its prune keeps there (the most shared memory and registers)."""
    best: dict[tuple, tuple[tuple, Planned]] = {}
    for item in planned:
        blocks, stages, warps = _tiles(item)
        key = (item.job.kernel, item.job.path, item.job.arch)
        score = (math.prod(blocks.values()) * stages, warps)
        if key not in best or score > best[key][0]:
            best[key] = (score, item)
    archs = sorted({arch for _, _, arch in best})
    dot = sorted({k for k, path, _ in best if path.startswith("fp32-")})  # kernels with an IEEE choice
    plain = sorted({k for k, _, _ in best} - set(dot))
    picks = {("_vq_nearest_kernel", "fp32-tf32", arch) for arch in archs}
    for i, kernel in enumerate(dot):
        for j, arch in enumerate(archs):
            picks.add((kernel, DOT_PATHS[(i + 2 * j) % len(DOT_PATHS)], arch))
    for i, kernel in enumerate(plain):
        paths = sorted({path for k, path, _ in best if k == kernel})
        picks.add((kernel, paths[i % len(paths)], archs[i % len(archs)]))
    return [best[key][1] for key in sorted(picks) if key in best]


# ------------------------------------------------------------------------------------- the verdict


def problems(rec: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled config, as short sentences (none: an empty list)."""
    if rec.get("error"):
        return [f"compile failed: {rec['error'].splitlines()[0][:300]}"]
    found = []
    limit = _limits.TARGETS[rec["target"]].smem_per_block
    if rec["shared"] > limit:
        found.append(f"shared memory {rec['shared']} B > the {rec['target']} per-block limit {limit} B")
    if rec.get("tmem") and rec["tmem"] > _limits.TMEM_COLUMNS:
        found.append(f"tensor memory {rec['tmem']} columns > {_limits.TMEM_COLUMNS}")
    if rec["spill_stores"] is None:
        found.append("no spill report from ptxas")
    elif max(rec["spill_stores"], rec["spill_loads"]) > _limits.MAX_SPILL_BYTES:
        found.append(
            f"register spills: {rec['spill_stores']} B stored, {rec['spill_loads']} B loaded per thread "
            f"(bound {_limits.MAX_SPILL_BYTES} B)"
        )
    if rec["tensor_core_expected"] and not rec["tensor_core"]:
        found.append(
            "a tensor-core tl.dot path (fp16 / bf16 / TF32) without mma, wgmma or tcgen05 in its PTX"
        )
    return found


def _require_compiler() -> None:
    from triton import knobs

    if knobs.runtime.interpret:
        raise BackendUnavailableError(
            "the AOT compile check needs Triton without its interpreter (TRITON_INTERPRET=1 makes every "
            "@triton.jit an interpreted function): call lad_fast.kernels.aot.check(), which runs it in a "
            "subprocess without the interpreter, or unset TRITON_INTERPRET"
        )


def check(
    calls: Mapping[str, list[OpCall]], paths: Iterable[str] = PATHS, targets: Iterable[str] = CI_TARGETS,
    subset: str = "all", workers: int = 1, timeout: float = 120.0,
    progress: Callable[[dict, int, int], None] | None = None, kernels: set[str] | None = None,
    keep_binary: bool = False, max_seconds: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Plan and compile the kernel launches of ``calls`` (per preset, ``record_op_calls``).

    ``subset``: "all" (every config), "frontier" (``frontier``) or "ci" (``ci_subset``); ``targets``: names
    in ``_limits.TARGETS``; ``kernels``: only these; ``max_seconds``: no compile starts after that long.
    Returns ``{"planned": jobs in the subset, "records": one per compiled config, with its "presets",
    "variants" and "problems"}``. In a process with the interpreter on this runs in a subprocess without
    it (``progress`` is then not called)."""
    if not triton_available():
        raise BackendUnavailableError(f"the AOT compile check compiles with Triton: {TRITON_INSTALL}")
    from triton import knobs

    paths, targets = list(paths), list(targets)
    unknown = (
        sorted({*paths} - {*PATHS})
        + sorted({*targets} - {*_limits.TARGETS})
        + sorted({*(kernels or ())} - kernel_names())
    )
    if unknown or subset not in SUBSETS:
        raise ConfigError(
            f"AOT check: unknown {', '.join(unknown) or f'subset {subset!r}'}; dtype paths are "
            f"{', '.join(PATHS)}, targets {', '.join(_limits.TARGETS)}, subsets {', '.join(SUBSETS)}, "
            f"kernels {', '.join(sorted(kernel_names()))}"
        )
    if knobs.runtime.interpret:
        return _check_in_subprocess(calls, paths, targets, subset, workers, timeout, kernels, max_seconds)
    start = time.monotonic()
    with CompilePool(workers, timeout, keep_binary, KERNEL_MODULES) as pool:  # workers start while this plans
        planned = plan(calls, paths, [_limits.TARGETS[t] for t in targets], kernels)
        if subset != "all":
            planned = {"frontier": frontier, "ci": ci_subset}[subset](planned)
        deadline = None if max_seconds is None else start + max_seconds
        records = compile_all([item.job for item in planned], pool, progress, deadline)
    done = []
    for rec, item in zip(records, planned, strict=True):
        if rec is not None:
            rec.update(presets=item.presets, variants=item.variants, problems=problems(rec))
            done.append(rec)
    return {"planned": len(planned), "records": done}


def _check_in_subprocess(calls, paths, targets, subset, workers, timeout, kernels, max_seconds) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        request, out = Path(tmp) / "request.pkl", Path(tmp) / "result.json"
        options = dict(
            paths=paths, targets=targets, subset=subset, workers=workers, timeout=timeout, kernels=kernels,
            max_seconds=max_seconds,
        )  # fmt: skip
        request.write_bytes(pickle.dumps({"calls": dict(calls), "options": options}))
        cmd = [sys.executable, "-m", "lad_fast.kernels.aot", str(request), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise BackendUnavailableError(
                f"the AOT check's subprocess (without TRITON_INTERPRET) failed with exit status "
                f"{done.returncode}; its output ends:\n{done.stderr[-4000:]}"
            )
        return json.loads(out.read_text())


def summary_line(rec: dict) -> str:
    cfg = " ".join(f"{k}={v}" for k, v in rec["config"].items())
    head = f"{rec['kernel']:<22} {rec['path']:<9} {rec['target']:<6} {cfg:<62}"
    if rec.get("error"):
        return f"{head} ERROR {rec['error'].splitlines()[0][:200]}"
    tc = ",".join(f"{op.split('.')[0]}x{n}" for op, n in rec["tensor_core"].items()) or "-"
    return (
        f"{head} shared {rec['shared']:>6} regs {rec['registers']:>3} spill {rec['spill_stores']}/"
        f"{rec['spill_loads']} tc {tc} {rec['seconds']}s"
    )


def main(argv: list[str] | None = None) -> int:
    """``check()``'s subprocess: ``python -m lad_fast.kernels.aot REQUEST.pkl RESULT.json``, the request
    (op calls and options) pickled by ``_check_in_subprocess`` in a temporary folder of its own."""
    parser = argparse.ArgumentParser(prog="python -m lad_fast.kernels.aot", description=main.__doc__)
    parser.add_argument("request", type=Path)
    parser.add_argument("result", type=Path)
    a = parser.parse_args(argv)
    request = pickle.loads(a.request.read_bytes())
    result = check(request["calls"], **request["options"])
    a.result.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
