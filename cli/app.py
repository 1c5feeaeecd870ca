"""The ``lad-fast`` command line. This module only assembles commands; each lives in its own module.

Heavy imports (torch, nibabel ...) happen inside commands so that ``--help`` is instant. Library errors
(:class:`lad_fast.errors.LadFastError`) and operating-system errors about a file (full disk, read-only
file system, permission denied, a file where a folder is needed, ...: :func:`os_error_line`) print as one
line and exit with code 2; ``LAD_FAST_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from lad_fast.cli import data_cmds, evaluate_cmd, export_cmd, generate_cmd, info_cmd, masks_cmd, plan_cmd
from lad_fast.cli.bench_cmd import bench_app
from lad_fast.cli.ssl_cmds import ssl_app
from lad_fast.cli.train_cmds import train_app

app = typer.Typer(
    name="lad-fast",
    help="Locality-Aware Diffusion for 3D abdominal CT: prepare data, train, generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("info")(info_cmd.info)
app.command("phantom")(data_cmds.phantom)
app.command("prepare")(data_cmds.prepare)
app.command("preview")(data_cmds.preview)
app.command("predict-masks")(masks_cmd.predict_masks)
app.command("import-masks")(masks_cmd.import_masks)
app.add_typer(train_app, name="train")
app.command("generate")(generate_cmd.generate)
app.command("export")(export_cmd.export)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("plan")(plan_cmd.plan)
app.add_typer(bench_app, name="bench")
app.add_typer(ssl_app, name="ssl")


def _debug() -> bool:
    return os.environ.get("LAD_FAST_DEBUG", "") not in ("", "0")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"lad-fast: warning: {message}\n"


def cpu_wait_policy(env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user
    chose a policy. With libgomp's default spin-wait, torch's CPU threads burn the cores they wait on:
    measured on two cores, one tiny denoiser step took 0.72 s instead of 0.034 s, worse again beside
    another busy process. Must run before torch is imported (libgomp reads it once, at load)."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# What to do about an operating-system error, by errno; the line names the file first.
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space and rerun the same command",
    errno.EDQUOT: "disk quota exceeded; free some space and rerun the same command",
    errno.EROFS: "the file system is read-only; choose an output folder on a writable one",
    errno.EACCES: "permission denied; choose a folder you may write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a folder you may write to (or fix its permissions)",
    errno.EEXIST: "exists, and is not the folder lad-fast needs there; move it away or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder where lad-fast needs a file; choose another path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
}


def os_error_line(err: OSError) -> str:
    """One line for an ``OSError`` about a file: the file (both, for a rename), what happened, and what to
    do (:data:`_OS_ADVICE`; otherwise the system's own words)."""
    path = os.fsdecode(err.filename)
    if err.filename2 is not None:
        path = f"{path} -> {os.fsdecode(err.filename2)}"
    advice = _OS_ADVICE.get(err.errno) if err.errno is not None else None
    return f"{path}: {advice or (err.strerror or str(err))}"


def continue_command(args: list[str], resume_flag: str) -> str:
    """The command line that continues interrupted work: the same arguments without ``--force`` (it would
    start over), plus ``resume_flag`` when given (``--resume`` for training)."""
    import shlex

    kept = [a for a in args if a != "--force"]
    if resume_flag and resume_flag not in kept:
        kept.append(resume_flag)
    return shlex.join(["lad-fast", *kept])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning library errors into one line and exit code 2, and
    SIGINT / SIGTERM into one line saying what was kept and how to continue, exit code 130 / 143."""
    import warnings

    cpu_wait_policy()

    from lad_fast.errors import LadFastError
    from lad_fast.utils.interrupts import Interrupted, raise_on_signals

    if not _debug():
        warnings.formatwarning = _one_line_warning

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Signals raise Interrupted, which Typer passes on (it would turn a KeyboardInterrupt into a silent
        # exit 130); long loops inside defer them to a safe point (lad_fast.utils.interrupts.deferred).
        with raise_on_signals():
            app(args=argv)  # standalone mode: usage errors and --help exit by themselves
    except LadFastError as err:
        if _debug():
            raise
        print(f"lad-fast: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if _debug() or err.filename is None:  # not about a file: a defect, shown with its traceback
            raise
        print(f"lad-fast: error: {os_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as err:
        if _debug():
            raise
        # Stopped outside a loop that says how to continue (setup, encoding, a second Ctrl-C): these
        # commands keep what they completed, so the same command continues.
        flag = err.resume_flag
        if flag is None and args:
            flag = {"train": "--resume", "generate": "", "prepare": "", "predict-masks": ""}.get(args[0])
        command = continue_command(args, flag) if flag is not None else None
        print(f"lad-fast: {err.line(command)}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C raised by Python itself, outside our handlers
        print("lad-fast: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
