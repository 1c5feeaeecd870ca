"""Checkpoints: versioned step folders and a ``latest`` pointer, so an interrupted write never loses one.

A model folder (``runs/<name>/<model>/``) holds::

    step-00000100/  model.safetensors [disc.safetensors ...] [ema.safetensors] state.pt meta.json
    step-00000200/  ...
    latest          "step-00000200": the newest complete step folder

Writing: the step folder is assembled under a temporary dot-name (every file fsynced, ``meta.json``
last, listing each file's size and SHA-256), renamed into place, then ``latest`` is atomically
replaced and older folders beyond ``keep`` are pruned. A kill at any point leaves ``latest`` naming a
complete folder (or, before the first pointer write, no pointer and at most one complete folder).
Reading verifies sizes and hashes, so truncation or corruption raises :class:`CheckpointError`
naming the file; ``fallback=True`` then tries the previous complete folder instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lad_fast.errors import CheckpointError
from lad_fast.utils.atomic import atomic_dir, follow_umask, write_failure, write_text

FORMAT = "lad-fast-checkpoint"
FORMAT_VERSION = 1
POINTER = "latest"
STATE_NAME = "state.pt"
META_NAME = "meta.json"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_step_dir_name(name: str) -> bool:
    """Whether ``name`` is a step folder's name (:func:`step_dir_name`)."""
    return bool(_STEP_RE.match(name))


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON-ready dict with sorted keys (tuples and lists hash alike)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def versions() -> dict[str, str]:
    from lad_fast import __version__

    return {"lad_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}


# -- RNG states -----------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, in types ``torch.load`` reads safely."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files ----------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint files, exported artefacts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _step_dirs(model_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking step folders, newest first (dot-named temporaries are never listed)."""
    if not model_dir.is_dir():
        return []
    out = []
    for p in model_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def latest_step_dir(model_dir: str | os.PathLike[str]) -> Path | None:
    """The folder ``latest`` names; without a pointer, the newest step folder; None when there is none.

    Only names are checked here; :func:`load_checkpoint` verifies contents.
    """
    model_dir = Path(model_dir)
    pointer = model_dir / POINTER
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if not _STEP_RE.match(name) or not (model_dir / name).is_dir():
            raise CheckpointError(
                f"{pointer} names {name!r}, which is not a checkpoint folder; the run folder is damaged "
                "(delete the pointer to fall back to the newest step folder)"
            )
        return model_dir / name
    dirs = _step_dirs(model_dir)
    return dirs[0][1] if dirs else None


def save_checkpoint(
    model_dir: str | os.PathLike[str],
    step: int,
    *,
    modules: Mapping[str, nn.Module],
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Write one checkpoint and point ``latest`` at it; returns the step folder.

    modules: ``{stem: module}`` saved as ``<stem>.safetensors`` (tied weights handled by safetensors).
    tensors: extra ``{stem: state_dict}`` (EMA weights) saved as ``<stem>.safetensors``.
    state: optimisers, scalers, RNG, step ... saved with ``torch.save`` as ``state.pt``.
    meta: JSON-ready dict written as ``meta.json`` with the file list (sizes and SHA-256) added.
    keep: complete step folders kept (at least 2, so a previous one survives a corrupted newest).
    A full disk is a one-line :class:`DiskFullError` naming the folder and the free space; the previous
    checkpoint stays the latest.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(model_dir)  # only rank 0 writes here
    name = step_dir_name(step)
    try:
        _write_step(model_dir / name, step, modules, tensors, state, meta)
    except Exception as err:  # torch and safetensors turn a full disk into RuntimeError / SafetensorError
        full = write_failure(model_dir / name, err)
        if full is None:
            raise
        raise full from err
    write_text(model_dir / POINTER, name + "\n")  # a full disk here names the pointer (atomic_path)
    # Prune only after the pointer moved: older folders beyond ``keep``, and newer ones left by a run
    # that was killed and resumed from an earlier step (they belong to an abandoned timeline).
    older = [p for s, p in _step_dirs(model_dir) if s < step]
    stale = [p for s, p in _step_dirs(model_dir) if s > step]
    for p in older[max(keep, 2) - 1 :] + stale:
        shutil.rmtree(p, ignore_errors=True)
    return model_dir / name


def clean_leftovers(model_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove what a killed checkpoint write left in ``model_dir``: hidden ``.step-*`` folders and
    ``.latest.*.tmp`` pointer temporaries (lad-fast's own temporary names only); returns them."""
    from lad_fast.utils.atomic import remove_temporaries

    return remove_temporaries(model_dir, lambda t: t == POINTER or bool(_STEP_RE.match(t)))


def _write_step(
    target: Path,
    step: int,
    modules: Mapping[str, nn.Module],
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> None:
    """One complete step folder at ``target`` (see :func:`save_checkpoint`)."""
    from safetensors.torch import save_file, save_model

    with atomic_dir(target) as tmp:
        for stem, module in modules.items():
            save_model(module, str(tmp / f"{stem}.safetensors"))
        for stem, sd in (tensors or {}).items():
            save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp / f"{stem}.safetensors"))
        torch.save(dict(state), tmp / STATE_NAME)
        files = {}
        for p in sorted(tmp.iterdir()):
            follow_umask(p)  # safetensors writes 0o600
            _fsync(p)
            files[p.name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        full_meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **dict(meta),
            "step": step,
            "files": files,
        }
        (tmp / META_NAME).write_text(json.dumps(full_meta, indent=2, default=str) + "\n", encoding="utf-8")
        _fsync(tmp / META_NAME)


@dataclass
class Checkpoint:
    """A verified checkpoint folder: ``meta`` and ``state`` are read, weights load on demand."""

    path: Path
    step: int
    meta: dict[str, Any]
    state: dict[str, Any]

    def has(self, stem: str) -> bool:
        return (self.path / f"{stem}.safetensors").is_file()

    def tensors(self, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.path / f"{stem}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint has no {stem!r} weights")
        return load_file(str(path), device=str(device))

    def load_module(self, stem: str, module: nn.Module) -> None:
        """Load ``<stem>.safetensors`` into ``module`` (strict: every key and shape must match)."""
        from safetensors.torch import load_model

        path = self.path / f"{stem}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint has no {stem!r} weights")
        try:
            first_tensor = next(iter(module.state_dict().values()), None)
            device = first_tensor.device if first_tensor is not None else torch.device("cpu")
            load_model(module, str(path), strict=True, device=str(device))
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:300]
            raise CheckpointError(
                f"{path} does not fit this {type(module).__name__} ({first}); "
                "the checkpoint was trained with another model config"
            ) from err


def _check_meta(meta: dict[str, Any], meta_path: Path) -> None:
    """Refuse a ``meta.json`` that is valid JSON but not what :func:`save_checkpoint` writes (an edited
    one), so that it fails here in one line instead of as a KeyError or SafetensorError further on."""
    files = meta.get("files")
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool) or meta["step"] < 0:
        what = f"step {meta.get('step')!r} is not a step number"
    elif not isinstance(files, dict) or not all(
        isinstance(info, dict)
        and isinstance(info.get("bytes"), int)
        and isinstance(info.get("sha256"), str)
        and Path(name).name == name not in ("", ".", "..")
        for name, info in files.items()
    ):
        what = "its file list is not {name: {bytes, sha256}} of files in the folder"
    elif not isinstance(meta.get("extra") or {}, dict):
        what = "extra is not a mapping"
    else:
        # every weight file must be covered by the hashes: an entry removed would skip the integrity check
        unlisted = sorted(
            p.name
            for p in meta_path.parent.iterdir()
            if (p.suffix == ".safetensors" or p.name == STATE_NAME) and p.name not in files
        )
        if not unlisted:
            return
        what = f"it does not list {', '.join(unlisted)}"
    raise CheckpointError(
        f"{meta_path} was edited or damaged ({what}); the checkpoint cannot be trusted: "
        "restore it or train again"
    )


def _verify(step_dir: Path, model: str) -> Checkpoint:
    meta_path = step_dir / META_NAME
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{meta_path} is missing; the checkpoint is incomplete") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path} is unreadable ({err}); the checkpoint is corrupt") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a lad-fast checkpoint description")
    _check_meta(meta, meta_path)
    if meta.get("model") != model:
        raise CheckpointError(
            f"{step_dir} holds a {meta.get('model')!r} checkpoint, not {model!r}; "
            "the run folder mixes models: use another --run"
        )
    for fname, info in meta.get("files", {}).items():
        path = step_dir / fname
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path} is truncated or damaged ({size} bytes, expected {info['bytes']})")
        if file_sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path} is corrupt (its SHA-256 does not match {meta_path.name})")
    try:
        state = torch.load(step_dir / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{step_dir / STATE_NAME} is unreadable ({type(err).__name__})") from err
    return Checkpoint(path=step_dir, step=int(meta["step"]), meta=meta, state=state)


def load_checkpoint(
    model_dir: str | os.PathLike[str], model: str, *, fallback: bool = False
) -> Checkpoint | None:
    """The latest complete checkpoint of ``model`` in ``model_dir``, verified; None when there is none.

    A corrupt or truncated latest checkpoint raises CheckpointError naming the file, unless ``fallback``
    is set: then older step folders are tried, newest first, with a warning naming what was skipped.
    """
    model_dir = Path(model_dir)
    latest = latest_step_dir(model_dir)
    if latest is None:
        return None
    try:
        return _verify(latest, model)
    except CheckpointError as first:
        if not fallback:
            raise
        latest_step = int(_STEP_RE.match(latest.name).group(1))  # type: ignore[union-attr]
        for step, path in _step_dirs(model_dir):
            if step >= latest_step:
                continue
            try:
                ckpt = _verify(path, model)
            except CheckpointError:
                continue
            warnings.warn(f"{first}; resuming from the previous checkpoint {path.name}", stacklevel=2)
            return ckpt
        raise CheckpointError(f"{first}; and no earlier complete checkpoint in {model_dir}") from first
