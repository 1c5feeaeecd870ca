"""``lad-fast bench``: run the benchmark scripts of the repository's ``bench/`` folder.

``bench/`` is not an installed package: the scripts are found beside the installed ``lad_fast.cli``
package in a source checkout (``pip install -e .``), or in the folder given by ``--scripts`` or
``LAD_FAST_BENCH_DIR``. Each script is loaded from its file and its ``main(argv)`` called, so the tables
it prints and the results it appends are the same as ``python bench/bench_<op>.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(
    help="Benchmarks of lad-fast's hot paths (kernel benchmarks need a CUDA GPU).", no_args_is_help=True
)

BENCH_DIR_ENV = "LAD_FAST_BENCH_DIR"
SCRIPTS = {"vq": "bench_vq_nearest.py", "attention": "bench_attention.py", "conv3d": "bench_conv3d.py"}


class KernelOp(str, Enum):
    vq = "vq"
    attention = "attention"
    conv3d = "conv3d"
    all = "all"


class BenchDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def default_bench_dir() -> Path:
    """``$LAD_FAST_BENCH_DIR``, else ``bench/`` of the source checkout this package was installed from."""
    env = os.environ.get(BENCH_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "bench"  # cli/ sits at the repository root


def find_scripts(folder: Path, ops: list[str]) -> dict[str, Path]:
    """The script file of each op, checked to exist; raises InputError naming where they were expected."""
    from lad_fast.errors import InputError

    paths = {op: folder / SCRIPTS[op] for op in ops}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(
            f"benchmark scripts {', '.join(missing)} not found in {folder}: `lad-fast bench` runs the "
            "scripts of the repository's bench/ folder, which a plain `pip install` does not include; "
            f"clone the repository and pass --scripts <repo>/bench (or set {BENCH_DIR_ENV})"
        )
    return paths


def run_script(path: Path, argv: list[str]) -> int:
    """Load a benchmark script from its file and return the exit code of its ``main(argv)``."""
    folder = str(path.parent)
    sys.path.insert(0, folder)  # the scripts import their sibling helper module ``_common``
    try:
        spec = importlib.util.spec_from_file_location(f"lad_fast_bench_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return int(module.main(argv) or 0)
    finally:
        sys.path.remove(folder)


@bench_app.callback()
def bench() -> None:
    """Benchmarks of lad-fast's hot paths, run side by side with the PyTorch paths."""


@bench_app.command("kernels")
def kernels(
    op: Annotated[KernelOp, typer.Option("--op", help="Which kernel to benchmark.")] = KernelOp.all,
    dtype: Annotated[
        BenchDtype | None, typer.Option("--dtype", help="Data type (default: each script's own).")
    ] = None,
    no_write: Annotated[
        bool, typer.Option("--no-write", help="Print only; append nothing to bench/results/.")
    ] = False,
    scripts: Annotated[
        Path | None,
        typer.Option(
            "--scripts",
            help=f"Folder of the bench scripts (default: ${BENCH_DIR_ENV}, else bench/ of the checkout).",
            file_okay=False,
        ),
    ] = None,  # fmt: skip
) -> None:
    """Time the Triton kernels against the PyTorch paths at the `lad` preset's shapes (needs CUDA).

    Prints each script's table (time, TFLOP/s or GB/s, peak memory, ratio against cdist + argmin, SDPA,
    cuDNN + GroupNorm + SiLU) and appends one JSON line per result to bench/results/<op>.jsonl.
    """
    ops = list(SCRIPTS) if op is KernelOp.all else [op.value]
    paths = find_scripts(scripts or default_bench_dir(), ops)

    import torch

    if not torch.cuda.is_available():
        from lad_fast.errors import BackendUnavailableError

        # exit 2 through the CLI's error path: nothing was measured, so this is not a success
        raise BackendUnavailableError(
            "lad-fast bench kernels needs a CUDA GPU (the Triton kernels run there): nothing measured, "
            "no result written"
        )
    from lad_fast.kernels._dispatch import TRITON_INSTALL, triton_available

    if not triton_available():
        from lad_fast.errors import BackendUnavailableError

        raise BackendUnavailableError(f"lad-fast bench kernels needs the triton package: {TRITON_INSTALL}")
    argv = (["--dtype", dtype.value] if dtype else []) + (["--no-write"] if no_write else [])
    failed = [name for name in ops if run_script(paths[name], argv) != 0]
    if failed:
        typer.echo(f"lad-fast bench kernels: {', '.join(failed)} failed", err=True)
        raise typer.Exit(1)


class SamplerPreset(str, Enum):
    tiny = "tiny"
    lad = "lad"


@bench_app.command("sampler")
def sampler(
    preset: Annotated[SamplerPreset, typer.Option("--preset", help="Network sizes.")] = SamplerPreset.tiny,
    backends: Annotated[
        str,
        typer.Option(
            "--backends",
            help="Comma list of torch, compile, onnx, onnx-tuned, trt (default: all; absent ones say why).",
        ),
    ] = "torch,compile,onnx,onnx-tuned,trt",
    n: Annotated[int, typer.Option("--n", help="Volumes timed per row.")] = 4,
    batch: Annotated[int, typer.Option("--batch", help="Volumes per sampler call.")] = 1,
    baseline_steps: Annotated[
        int, typer.Option(help="DDPM steps timed for the official baseline (scaled to its 300).")
    ] = 300,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    note: Annotated[
        str, typer.Option("--note", help="Recorded with the result (e.g. a shared machine).")
    ] = "",
    no_write: Annotated[
        bool, typer.Option("--no-write", help="Print only; append nothing to bench/results/.")
    ] = False,
    scripts: Annotated[
        Path | None,
        typer.Option(
            "--scripts", help=f"Folder of the bench scripts (default: ${BENCH_DIR_ENV}).", file_okay=False
        ),
    ] = None,  # fmt: skip
) -> None:
    """Seconds per volume and volumes per minute, split into denoiser, decode and write, per backend,
    beside Lad's official configuration (DDPM 300, eager, batch 1) on the same untrained network.

    Appends one JSON line to bench/results/sampler.jsonl.
    """
    folder = scripts or default_bench_dir()
    path = folder / "bench_sampler.py"
    if not path.is_file():
        from lad_fast.errors import InputError

        raise InputError(
            f"bench_sampler.py not found in {folder}: clone the repository and pass --scripts <repo>/bench "
            f"(or set {BENCH_DIR_ENV})"
        )
    argv = ["--preset", preset.value, "--backends", backends, "--n", str(n), "--batch", str(batch)]
    argv += ["--baseline-steps", str(baseline_steps), "--device", device, "--note", note]
    argv += ["--no-write"] if no_write else []
    if run_script(path, argv) != 0:
        raise typer.Exit(1)
