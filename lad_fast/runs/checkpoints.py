"""Checkpoints: versioned step folders and a ``latest`` pointer, so an interrupted write never loses one.

A model folder (``runs/<name>/<model>/``) holds::

    step-00000100/  model.safetensors [disc.safetensors ...] [ema.safetensors] state.pt meta.json digest
    step-00000200/  ...
    latest          "step-00000200": the newest complete step folder

Writing: the step folder is assembled under a temporary dot-name (every file fsynced, ``meta.json``
listing each weight and state file's size and SHA-256, then ``digest`` last: the SHA-256 of every other
file of the folder, ``meta.json`` included, in ``sha256sum`` form), renamed into place, then ``latest`` is
atomically replaced and older folders beyond ``keep`` are pruned. The checkpoint's content hash
(:func:`digest_hash`) is the hash of ``digest``: it changes when any file of the step changes, the
normalisation and config in ``meta.json`` as well as the weights. A kill at any point leaves ``latest``
naming a complete folder (or, before the first pointer write, no pointer and at most one complete
folder). Reading verifies ``meta.json`` against ``digest`` and every file against its recorded size and
hash, so an edit, truncation or corruption raises :class:`CheckpointError` naming the file (a step
folder without ``digest``, written before lad-fast recorded one, is read with its weights checked
alone); ``fallback=True`` then tries the previous complete folder instead.
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
FORMAT_VERSION = 2  # 2: the step folder has a ``digest`` covering meta.json too
POINTER = "latest"
STATE_NAME = "state.pt"
META_NAME = "meta.json"
DIGEST_NAME = "digest"
_DIGEST_LINE_RE = re.compile(r"^([0-9a-f]{64})  ([^/\\]+)$")
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
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{pointer} is unreadable ({type(err).__name__}); the run folder is damaged "
                "(delete the pointer to fall back to the newest step folder)"
            ) from err
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
        digest = {name: info["sha256"] for name, info in files.items()}
        digest[META_NAME] = file_sha256(tmp / META_NAME)
        (tmp / DIGEST_NAME).write_text(_digest_text(digest), encoding="utf-8")
        follow_umask(tmp / DIGEST_NAME)
        _fsync(tmp / DIGEST_NAME)


def _digest_text(digest: Mapping[str, str]) -> str:
    """``sha256sum`` lines (``<hex>  <name>``), sorted by name: the bytes :func:`digest_hash` hashes."""
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(digest.items()))


def read_digest(step_dir: str | os.PathLike[str]) -> tuple[dict[str, str], str] | None:
    """``({file name: SHA-256}, content hash)`` of a step folder's ``digest``; None when it has none
    (a checkpoint of a lad-fast that wrote no digest). CheckpointError naming the file when it is not
    what :func:`save_checkpoint` writes."""
    path = Path(step_dir) / DIGEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(
            f"{path} is unreadable ({err.strerror or err}); the checkpoint is damaged"
        ) from err
    digest: dict[str, str] = {}
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["<not UTF-8>"]
    for line in lines:
        m = _DIGEST_LINE_RE.match(line)
        if m is None or m.group(2) in digest:
            digest = {}
            break
        digest[m.group(2)] = m.group(1)
    if META_NAME not in digest or raw.decode("utf-8", "replace") != _digest_text(digest):
        raise CheckpointError(
            f"{path} was edited or damaged (not one '<sha256>  <file>' line per file of the checkpoint); "
            "the checkpoint cannot be trusted: restore it or train again"
        )
    return digest, hashlib.sha256(raw).hexdigest()[:16]


def files_hash(files: Mapping[str, Any]) -> str:
    """The content hash of a step folder without ``digest``: its weight files' hashes as ``meta.json``
    lists them (what lad-fast recorded before ``meta.json`` itself was covered)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def digest_hash(step_dir: str | os.PathLike[str]) -> str:
    """The content hash of a step folder (16 hex digits): the SHA-256 of its ``digest``, which lists
    every file's hash, ``meta.json`` included; for a folder without one, :func:`files_hash` of its
    ``meta.json``. Reads no weights; :func:`load_checkpoint` checks that the files match it."""
    step_dir = Path(step_dir)
    read = read_digest(step_dir)
    if read is not None:
        return read[1]
    meta_path = step_dir / META_NAME
    try:
        files = json.loads(meta_path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{meta_path} is unreadable ({type(err).__name__}: {err}); the checkpoint is damaged"
        ) from err
    return files_hash(files)


@dataclass
class Checkpoint:
    """A verified checkpoint folder: ``meta`` and ``state`` are read, weights load on demand."""

    path: Path
    step: int
    meta: dict[str, Any]
    state: dict[str, Any]
    content_hash: str = ""  # :func:`digest_hash` of the folder, checked against its files

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


def read_step_meta(step_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """``(meta.json, content hash)`` of a step folder, ``meta.json`` checked against ``digest`` and its
    shape against what :func:`save_checkpoint` writes; no weights are read (:func:`load_checkpoint`
    checks them). CheckpointError naming the file that is missing, edited or damaged."""
    step_dir = Path(step_dir)
    meta_path = step_dir / META_NAME
    read = read_digest(step_dir)
    if read is not None and meta_path.is_file() and file_sha256(meta_path) != read[0][META_NAME]:
        raise CheckpointError(
            f"{meta_path} was changed after the checkpoint was written (its SHA-256 does not match "
            f"{step_dir / DIGEST_NAME}); the checkpoint cannot be trusted: restore it or train again"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{meta_path} is missing; the checkpoint is incomplete") from err
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{meta_path} is unreadable ({err}); the checkpoint is corrupt") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a lad-fast checkpoint description")
    _check_meta(meta, meta_path)
    version = meta.get("format_version")
    if read is None:
        if version != 1:
            raise CheckpointError(
                f"{step_dir / DIGEST_NAME} is missing (the checkpoint's format version {version!r} "
                "records one); the checkpoint cannot be trusted: restore it or train again"
            )
        return meta, files_hash(meta["files"])
    listed = {name: info["sha256"] for name, info in meta["files"].items()}
    listed[META_NAME] = read[0][META_NAME]
    if listed != read[0]:
        raise CheckpointError(
            f"{step_dir / DIGEST_NAME} does not list the files {META_NAME} lists; the checkpoint "
            "cannot be trusted: restore it or train again"
        )
    return meta, read[1]


def _verify(step_dir: Path, model: str) -> Checkpoint:
    meta_path = step_dir / META_NAME
    meta, content = read_step_meta(step_dir)
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
    return Checkpoint(path=step_dir, step=int(meta["step"]), meta=meta, state=state, content_hash=content)


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
