"""Exported artefacts on disk: names, the metadata JSON beside each, matching, and output-folder ownership.

Every artefact ``<kind>.<precision>.<onnx|engine>`` (kind: denoiser or decoder) has a metadata file
``<artefact>.json`` beside it (:func:`write_meta`): the artefact's SHA-256, input and output shapes,
precision, opset, batch range, the checkpoint it was exported from, the versions of lad-fast, torch,
ONNX, ONNX Runtime, TensorRT and ModelOpt, the GPU (name, compute capability) when there is one, and
``files``: what this export wrote, which is all ``--force`` ever deletes (:func:`prepare_out`).

An artefact and its metadata become visible together (:func:`publish`): the artefact is written and
verified under a hidden staging name, then its metadata (naming the file and its hash) is written, then
the artefact is renamed into place. A kill between the two leaves metadata whose file is missing: a
pending export, which ``lad-fast export`` (with or without ``--force``) removes and redoes
(:func:`clear_pending`), and which ``generate`` refuses naming that command.

:func:`check_artefact` refuses an artefact, with the reasons, when it is not what the caller needs: another
checkpoint, a changed file, and for TensorRT engines another TensorRT version, another GPU, or a batch
outside the engine's optimisation profile. ONNX graphs have a dynamic batch axis and are portable, so
neither the batch nor the GPU is checked for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lad_fast.errors import CheckpointError, ConfigError, OutputExistsError
from lad_fast.runs.checkpoints import file_sha256
from lad_fast.utils.atomic import write_json

FORMAT = "lad-fast-export/1"
KINDS = ("denoiser", "decoder")
TARGETS = ("onnx", "trt")
SUFFIX = {"onnx": ".onnx", "trt": ".engine"}
# The denoiser's graph batch is twice the volumes: guidance runs the conditional and null branches together
GRAPH_BATCH_FACTOR = {"denoiser": 2, "decoder": 1}


@dataclass(frozen=True)
class BatchRange:
    """Volumes per sampler call an engine is built for: min <= opt <= max (TensorRT's profile)."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """``"1:4:16"`` -> BatchRange(1, 4, 16); ConfigError naming the rule otherwise."""
        parts = text.split(":")
        try:
            lo, opt, hi = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(
                f"--batch-range {text!r}: expected MIN:OPT:MAX volumes per call, e.g. 1:4:16"
            ) from None
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(f"--batch-range {text!r}: need 1 <= MIN <= OPT <= MAX, e.g. 1:4:16")
        return cls(lo, opt, hi)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def artefact_name(kind: str, precision: str, target: str) -> str:
    return f"{kind}.{precision}{SUFFIX[target]}"


ALL_NAMES = frozenset(
    artefact_name(k, p, t) for k in KINDS for p in ("fp32", "fp16", "bf16") for t in TARGETS
)


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def gpu_info() -> dict[str, str] | None:
    """{"name", "compute_capability"} of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions of what made an artefact, and the GPU (None on a CPU-only machine)."""
    import lad_fast

    versions = {"lad_fast": lad_fast.__version__}
    for key, dist in (
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("tensorrt", "tensorrt"),
        ("modelopt", "nvidia-modelopt"),
    ):
        versions[key] = _version(dist)
    if versions["onnxruntime"] is None:
        versions["onnxruntime"] = _version("onnxruntime-gpu")
    return {"versions": versions, "gpu": gpu_info()}


def staging_path(path: Path) -> Path:
    """The hidden name artefact ``path`` is written and verified under before :func:`publish`."""
    return path.with_name(f".staging.{path.name}")


def write_meta(path: Path, sha256: str | None = None, **fields: Any) -> dict[str, Any]:
    """Write ``<path>.json`` for the artefact ``path`` (its SHA-256 given, or read from ``path``);
    returns the metadata."""
    meta = {
        "format": FORMAT,
        "file": path.name,
        "sha256": sha256 if sha256 is not None else file_sha256(path),
        "files": [path.name, meta_path(path).name],
        **fields,
        **environment(),
    }
    if isinstance(meta.get("batch"), BatchRange):
        meta["batch"] = asdict(meta["batch"])
    write_json(meta_path(path), meta)
    return meta


def publish(staged: Path, path: Path, **fields: Any) -> dict[str, Any]:
    """Make the artefact written at ``staged`` (:func:`staging_path`) visible as ``path`` with its
    metadata: the metadata first, then the file renamed into place, so no reader ever sees the file
    without its metadata; returns the metadata."""
    meta = write_meta(path, sha256=file_sha256(staged), **fields)
    os.replace(staged, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return meta


def clear_pending(out: Path) -> list[str]:
    """Remove what an interrupted export left in ``out``: staging files, and metadata whose artefact was
    never renamed into place (:func:`publish`); returns the metadata names removed. Call it only while
    holding the folder's lock."""
    removed = []
    for name in sorted(ALL_NAMES):
        path = Path(out) / name
        staging_path(path).unlink(missing_ok=True)
        meta = read_meta(path)
        if meta is not None and meta.get("file") == name and not path.exists():
            meta_path(path).unlink()
            removed.append(meta_path(path).name)
    return removed


def read_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of artefact ``path``; None when ``path`` has no lad-fast metadata beside it."""
    mp = meta_path(path)
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def damage(meta: dict[str, Any], path: Path) -> str | None:
    """What is wrong with the fields of lad-fast metadata ``meta`` of ``path`` (None when nothing)."""
    batch, versions = meta.get("batch"), meta.get("versions")
    if meta.get("file") != path.name:
        return f"it names the file {meta.get('file')!r}"
    if not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("checkpoint"), str):
        return "its sha256 or checkpoint is not a string"
    if meta.get("target") not in TARGETS:
        return f"its target {meta.get('target')!r} is not one of {', '.join(TARGETS)}"
    if batch is not None and not (
        isinstance(batch, dict) and all(type(batch.get(k)) is int for k in ("min", "opt", "max"))
    ):
        return "its batch is not {min, opt, max}"
    if versions is not None and not isinstance(versions, dict):
        return "its versions are not a mapping"
    if meta.get("gpu") is not None and not isinstance(meta.get("gpu"), dict):
        return "its gpu is not a mapping"
    return None


def mismatches(meta: dict[str, Any], path: Path, *, checkpoint: str, batch: int | None = None) -> list[str]:
    """Why artefact ``path`` with metadata ``meta`` cannot serve ``checkpoint`` at ``batch`` volumes here
    (empty when it can)."""
    reasons = []
    if meta.get("checkpoint") != checkpoint:
        reasons.append(
            f"it was exported from checkpoint {meta.get('checkpoint')}, the run now holds {checkpoint}"
        )
    if not path.is_file():
        reasons.append("the file is missing (an export interrupted before it was in place?)")
    elif file_sha256(path) != meta.get("sha256"):
        reasons.append("the file changed since it was exported (its SHA-256 differs from the metadata)")
    if meta.get("target") == "trt":
        here = environment()
        built, now = meta.get("versions", {}).get("tensorrt"), here["versions"]["tensorrt"]
        if built != now:
            reasons.append(f"it was built with TensorRT {built}, this machine has TensorRT {now}")
        if meta.get("gpu") != here["gpu"]:
            reasons.append(
                f"it was built for GPU {_gpu_text(meta.get('gpu'))}, "
                f"this machine has {_gpu_text(here['gpu'])}"
            )
        rng = meta.get("batch") or {}
        if batch is not None and not rng.get("min", 1) <= batch <= rng.get("max", 0):
            reasons.append(
                f"--batch {batch} is outside its optimisation profile "
                f"({rng.get('min')}..{rng.get('max')} volumes per call)"
            )
    return reasons


def _gpu_text(gpu: dict[str, str] | None) -> str:
    return "none" if not gpu else f"{gpu.get('name')} (compute capability {gpu.get('compute_capability')})"


def check_artefact(path: Path, *, checkpoint: str, batch: int | None = None, run: Path | None = None) -> dict:
    """The metadata of ``path`` when it serves ``checkpoint`` at ``batch``; CheckpointError with every reason
    and the command that re-exports otherwise."""
    meta = read_meta(path)
    redo = f"lad-fast export --run {run} --force" if run is not None else "lad-fast export --force"
    if meta is None:
        raise CheckpointError(
            f"{path} was not written by lad-fast export (no {meta_path(path).name} beside it); move it "
            f"out of {path.parent} or run `{redo}`"
        )
    why = damage(meta, path)
    if why is not None:
        raise CheckpointError(f"{meta_path(path)} was edited or damaged ({why}); re-export with `{redo}`")
    reasons = mismatches(meta, path, checkpoint=checkpoint, batch=batch)
    if reasons:
        hint = redo
        if meta.get("target") == "trt":
            hint += f" --target trt --batch-range 1:{batch or 4}:{max(16, batch or 0)}"
        raise CheckpointError(f"{path} cannot be used: {'; '.join(reasons)}; re-export it with `{hint}`")
    return meta


def owned_files(out: Path) -> set[str]:
    """Names in ``out`` that some lad-fast export metadata there lists as written by it."""
    owned: set[str] = set()
    for mp in out.glob("*.json"):
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(meta, dict)
            and meta.get("format") == FORMAT
            and meta.get("file") in ALL_NAMES  # a metadata file never makes --force reach other files
            and meta.get("files") == [meta["file"], mp.name]
            and mp.name == meta["file"] + ".json"
        ):
            owned.update(meta["files"])
    return owned


def prepare_out(out: Path, names: list[str], force: bool) -> None:
    """Make ``out`` ready for an export that writes ``names`` (artefacts and their metadata).

    Without ``force``: refused when ``out`` holds anything (foreign files, or an earlier export that would
    be overwritten). With ``force``: deletes only the files earlier exports recorded as theirs; foreign
    files stay, and one that has a name this export writes is refused. Nothing is written before the checks
    but the removal of what an interrupted export left (:func:`clear_pending`), which is redone.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; choose a folder")
    if out.is_dir():
        clear_pending(out)  # an interrupted export: redone below
    present = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    owned = owned_files(out) if present else set()
    foreign = [n for n in present if n not in owned]
    if not force and present:
        what = f"files lad-fast did not write ({', '.join(foreign[:5])})" if foreign else "an earlier export"
        raise OutputExistsError(
            f"--out {out} holds {what}; choose an empty folder, or pass --force to replace what lad-fast "
            "export wrote there (other files are never deleted)"
        )
    clash = [n for n in foreign if n in names]
    if clash:
        raise OutputExistsError(
            f"--out {out} holds {', '.join(clash)}, which lad-fast export did not write and would overwrite; "
            "move it out or choose another --out"
        )
    for name in sorted(owned):
        (out / name).unlink(missing_ok=True)
