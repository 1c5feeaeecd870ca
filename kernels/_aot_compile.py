"""Compiling one kernel launch ahead of time and reading what the binary needs (for ``kernels/aot.py``).

A ``Job`` is a kernel, its launch arguments (tensors as ``TensorSpec``: shape, strides, dtype) and one
config, for one architecture. ``compile_job`` binds and specialises it with Triton's own binder, as
``JITFunction.run`` does on a device of that architecture (pointers count as 16-byte aligned, as torch
allocates them), compiles it with ``triton.compile`` for a ``GPUTarget``, and reads:

- registers, stack and static shared memory from the cubin (the bundled ``cuobjdump
  --dump-resource-usage``);
- spill stores / loads (bytes per thread) from ptxas' ``-v`` report, which Triton's build runs anyway;
- the dynamic shared memory a launch requests (``metadata.shared``: what Triton checks against the
  device's per-block limit) and, on sm_100, the tensor-memory columns;
- tensor-core instructions in the PTX: ``mma.sync`` (sm_80 and small tiles), ``wgmma.mma_async``
  (sm_90), ``tcgen05.mma`` (sm_100).

``compile_all`` runs jobs on a ``CompilePool`` of worker processes, each compile under a time limit (a
compile that hangs in the compiler is killed and reported, not waited for). Workers compile without
Triton's cache: the check must compile, and a cached kernel would skip ptxas' report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

TENSOR_CORE_OPS = ("mma.sync", "wgmma.mma_async", "tcgen05.mma")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor argument by shape, strides and dtype, rebuilt as a meta tensor where one is needed."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str  # "float32", "int64", ...

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."))

    def meta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dt = dtype or getattr(torch, self.dtype)
        return torch.empty_strided(self.shape, self.stride, dtype=dt, device="meta")


def materialise(values: tuple) -> list[Any]:
    return [v.meta() if isinstance(v, TensorSpec) else v for v in values]


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel launch with one config, for one architecture."""

    module: str
    handle: str  # attribute of ``module``: the @triton.jit function or its autotuner
    kernel: str  # the @triton.jit function's name
    path: str  # how it computes products: "fp32-ieee", "fp32-tf32", "fp16", "bf16" or "fp32" (no dot)
    arch: int  # 80, 90, 100
    args: tuple  # launch arguments, TensorSpec for tensors
    kwargs: tuple  # sorted (name, value): the launch's constexprs and options, the config's included
    config: tuple  # sorted (name, value): the config alone (tile sizes, num_warps, num_stages)


def jit_function(handle):
    """The @triton.jit function of a handle: itself, or the function its autotuner wraps."""
    from triton.runtime.autotuner import Autotuner

    return handle.fn if isinstance(handle, Autotuner) else handle


def _bind(job: Job):
    """(fn, (options, signature, constexprs, attrs)): what ``JITFunction.run`` would pass to ``compile``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(getattr(importlib.import_module(job.module), job.handle))
    backend = make_backend(GPUTarget("cuda", job.arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(job.kwargs)
    bound, specialization, options = binder(*materialise(job.args), **kwargs)
    return fn, fn._pack_args(backend, kwargs, bound, specialization, options)


def record_head(job: Job) -> dict[str, Any]:
    """The fields of a job's record that need no compile."""
    fn = jit_function(getattr(importlib.import_module(job.module), job.handle))
    kwargs = dict(job.kwargs)
    config = dict(job.config)
    uses_dot = "tl.dot(" in inspect.getsource(fn.fn)
    return {
        "kernel": job.kernel, "path": job.path, "target": f"sm_{job.arch}", "config": config,
        "IEEE": kwargs.get("IEEE"),
        "flags": {k: v for k, v in kwargs.items() if k not in config and not isinstance(v, TensorSpec)},
        # every dot kernel has the IEEE constexpr: True means fp32 FMA products, anything else tensor cores
        "tensor_core_expected": uses_dot and not kwargs.get("IEEE", False),
        "error": None,
    }  # fmt: skip


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True)
    done.check_returncode()
    line = next(ln for ln in done.stdout.splitlines() if "REG:" in ln)  # " REG:40 STACK:0 SHARED:0 ..."
    fields = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return {"registers": fields["REG"], "stack": fields["STACK"], "static_shared": fields["SHARED"]}


def compile_job(job: Job, keep_binary: bool = False) -> dict[str, Any]:
    """Compile one job; its record (``error`` set instead of resources when the compile fails)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = record_head(job)
    t0 = time.perf_counter()
    try:
        fn, (options, signature, constexprs, attrs) = _bind(job)
        log = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v report; it carries the spills
        with contextlib.redirect_stdout(log):
            src = ASTSource(fn, signature, constexprs, attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options.__dict__)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        ptx = kernel.asm["ptx"]
        record.update(_resource_usage(kernel.asm["cubin"]))
        record.update(
            shared=kernel.metadata.shared,
            spill_stores=int(spills.group(1)) if spills else None,
            spill_loads=int(spills.group(2)) if spills else None,
            tensor_core={op: ptx.count(op) for op in TENSOR_CORE_OPS if op in ptx},
            tmem=getattr(kernel.metadata, "tmem_size", None),
            function=kernel.metadata.name,
        )
        if keep_binary:
            record["cubin"] = kernel.asm["cubin"].hex()
    except Exception as e:  # noqa: BLE001 - a compile error is the finding, not a crash of the check
        record["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _worker(conn, cache_dir: str, keep_binary: bool, preload: tuple[str, ...]) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton.compiler  # noqa: F401 - imported before the first job arrives
    from triton import knobs

    for module in preload:
        importlib.import_module(module)
    knobs.compilation.always_compile = True
    while (job := conn.recv()) is not None:
        conn.send(compile_job(job, keep_binary))


class CompilePool:
    """Worker processes compiling one job at a time each; a compile past ``timeout`` seconds is killed.

    The workers start (and import torch, Triton and the ``preload`` modules) when the pool is entered, so
    that a caller can plan its jobs meanwhile; they compile without Triton's cache (``compile_all``)."""

    def __init__(
        self, size: int, timeout: float = 120.0, keep_binary: bool = False, preload: tuple[str, ...] = ()
    ) -> None:
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        self.size, self.timeout, self.keep_binary, self.preload = max(1, size), timeout, keep_binary, preload
        self.idle: list[tuple[Any, Any]] = []

    def __enter__(self) -> CompilePool:
        self._cache = tempfile.TemporaryDirectory(prefix="lad_fast_aot_")
        self.idle = [self._start() for _ in range(self.size)]
        return self

    def __exit__(self, *exc) -> None:
        for proc, conn in self.idle:
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.idle = []
        self._cache.cleanup()

    def _start(self):
        parent, child = self.ctx.Pipe()
        args = (child, self._cache.name, self.keep_binary, self.preload)
        proc = self.ctx.Process(target=_worker, args=args, daemon=True)
        proc.start()
        return proc, parent

    def map(self, jobs: list[Job], deadline: float | None = None) -> Iterator[tuple[int, dict]]:
        """(index in ``jobs``, record) as compiles finish. No job starts after ``deadline`` (a
        ``time.monotonic()`` value): the jobs not started then get no record."""
        from multiprocessing.connection import wait

        pending = list(reversed(range(len(jobs))))
        busy: dict[Any, tuple[int, Any, float]] = {}  # connection -> (job index, process, start)
        while busy or (pending and (deadline is None or time.monotonic() < deadline)):
            while self.idle and pending and (deadline is None or time.monotonic() < deadline):
                proc, conn = self.idle.pop()
                i = pending.pop()
                conn.send(jobs[i])
                busy[conn] = (i, proc, time.monotonic())
            for conn in wait(list(busy), timeout=1.0):
                i, proc, _ = busy.pop(conn)
                try:
                    rec = conn.recv()
                    self.idle.append((proc, conn))
                except (EOFError, ConnectionResetError):  # the worker died (memory, a compiler crash)
                    rec = {**record_head(jobs[i]), "error": "the compiling process died", "seconds": None}
                    self.idle.append(self._start())
                yield i, rec
            now = time.monotonic()
            for conn, (i, proc, start) in list(busy.items()):
                if now - start > self.timeout:
                    proc.kill()
                    proc.join()
                    del busy[conn]
                    error = f"timeout: the compile took over {self.timeout:.0f} s"
                    yield i, {**record_head(jobs[i]), "error": error, "seconds": round(now - start, 1)}
                    self.idle.append(self._start())


def compile_all(
    jobs: list[Job], pool: CompilePool, progress: Callable[[dict, int, int], None] | None = None,
    deadline: float | None = None,
) -> list[dict | None]:  # fmt: skip
    """Compile every job on ``pool``: the records in job order (None for a job not started before
    ``deadline``), with the cubin (hex) under "cubin" when the pool keeps binaries. ``progress(record,
    done, total)`` as they finish."""
    records: list[dict | None] = [None] * len(jobs)
    for done, (i, rec) in enumerate(pool.map(jobs, deadline), 1):
        records[i] = rec
        if progress:
            progress(rec, done, len(jobs))
    return records


def load_on_device(records: list[dict]) -> None:
    """Load each record's binary (``keep_binary``) on the current CUDA device, as a launch does: the
    driver's registers and spills go into the record ("device_registers", "device_spills"); a refusal
    (shared memory above what the device allows) or a register count other than the cubin's goes into
    its problems. The binary is dropped from the record."""
    from triton.runtime import driver

    device = torch.cuda.current_device()
    for rec in records:
        cubin = rec.pop("cubin", None)
        if cubin is None:
            continue
        try:
            load = driver.active.utils.load_binary
            _, _, n_regs, n_spills, _ = load(rec["function"], bytes.fromhex(cubin), rec["shared"], device)
        except Exception as e:  # noqa: BLE001 - the refusal is the finding
            rec["problems"].append(f"the device refused the binary: {e}")
            continue
        rec.update(device_registers=n_regs, device_spills=n_spills)
        if n_regs != rec["registers"]:
            rec["problems"].append(f"the driver reports {n_regs} registers, cuobjdump {rec['registers']}")
