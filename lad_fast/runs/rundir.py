"""Run directories: ``runs/<name>/`` with the resolved config, one folder per trained model, and a log.

Layout::

    runs/<name>/
      config.json            resolved LadConfig (lad_fast.config.config_to_dict)
      log.jsonl              one JSON object per line, every model's training appends here
      vqgan/ diffusion/ segmenter/
        step-00000100/       one complete checkpoint (see lad_fast.runs.checkpoints)
        latest               pointer file naming the newest complete step folder

A run folder is created by lad-fast or refused: a folder that holds files lad-fast did not write raises
:class:`OutputExistsError`, never gets overwritten. Reopening a run with a config whose model or data
fields differ raises :class:`CheckpointError` naming the fields (training schedules such as ``steps``
may change between invocations; the newest resolved config is recorded).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lad_fast.config import LadConfig, config_from_dict, config_to_dict
from lad_fast.errors import CheckpointError, ConfigError, OutputExistsError
from lad_fast.utils.atomic import append_line, write_json

# ssl, finetune: self-supervised pretraining and few-label fine-tuning of the segmenter (lad_fast.ssl).
MODELS = ("vqgan", "diffusion", "segmenter", "ssl", "finetune")
CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
# Everything lad-fast itself puts in a run folder; dot-files are temporaries of atomic writes.
_KNOWN = {CONFIG_NAME, LOG_NAME, "previews", "export", *MODELS}
# Files a trainer writes in its model folder besides checkpoints (--force removes them too).
_MODEL_CACHES = ("latents.safetensors",)
_PREVIEW_RE = re.compile(r"step-\d{8,}\.png")
# Config sections that may change when a run is reopened: they steer training, not what is trained.
_MUTABLE_SECTIONS = ("vqgan_train", "diffusion_train", "segmenter_train", "sampling")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted field names whose values differ, as ``"a.b: old -> new"`` strings (sorted)."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [
        f"{k}: {a.get(k, '<missing>')} -> {b.get(k, '<missing>')}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<missing>") != b.get(k, "<missing>")
    ]


class RunDir:
    """One run folder. Build it with :meth:`create` (new or compatible run) or :meth:`open` (existing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._config: LadConfig | None = None  # parsed on the first config() call

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    # -- creation and validation ------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], cfg: LadConfig) -> RunDir:
        """Create ``path`` as a run for ``cfg``, or reopen it if it is a run with a compatible config.

        Raises OutputExistsError when ``path`` holds files lad-fast did not write, and CheckpointError
        when it is a run whose config differs outside the training-schedule sections.
        """
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise OutputExistsError(f"{run.path} is a file, not a run folder; choose another --run")
        # Dot-files are temporaries (another rank may be writing config.json right now).
        if run.path.is_dir() and any(not q.name.startswith(".") for q in run.path.iterdir()):
            run.check_layout()
            old = json.loads(json.dumps(run.config_dict()))  # tuples as JSON lists, like new
            new = json.loads(json.dumps(config_to_dict(cfg)))
            strict_old = {k: v for k, v in old.items() if k not in _MUTABLE_SECTIONS}
            strict_new = {k: v for k, v in new.items() if k not in _MUTABLE_SECTIONS}
            diff = config_diff(strict_old, strict_new)
            if diff:
                raise CheckpointError(
                    f"run {run.path} was created with another config ({'; '.join(diff)}); "
                    "use a new --run, or the original preset and options"
                )
            if old != new:
                write_json(run.config_path, new)
                run._config = None  # config() reads the config just written
            return run
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(run.config_path, config_to_dict(cfg))
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunDir:
        """An existing run; CheckpointError when ``path`` is not one."""
        run = cls(path)
        if not run.path.is_dir():
            parent = run.path.parent
            names = (
                sorted(p.name for p in parent.iterdir() if (p / CONFIG_NAME).is_file())
                if parent.is_dir()
                else []
            )
            if names:  # the user most likely mistyped one of these
                hint = f"runs in {parent}: {', '.join(names[:10])}; pass one of them with --run"
            else:
                hint = f"no runs in {parent}; train a model first or pass another --run"
            raise CheckpointError(f"run folder {run.path} does not exist ({hint})")
        run.check_layout()
        return run

    def check_layout(self) -> None:
        """Raise unless this folder looks like something lad-fast wrote (a config and known entries)."""
        if not self.config_path.is_file():
            names = sorted(p.name for p in self.path.iterdir())[:5]
            raise OutputExistsError(
                f"{self.path} is not a lad-fast run (no {CONFIG_NAME}; it holds {', '.join(names)}); "
                "choose another --run or empty that folder yourself"
            )
        foreign = sorted(
            p.name for p in self.path.iterdir() if p.name not in _KNOWN and not p.name.startswith(".")
        )
        if foreign:
            raise OutputExistsError(
                f"run folder {self.path} holds files lad-fast did not write ({', '.join(foreign[:5])}); "
                "move them out or choose another --run"
            )

    def _raw_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{self.config_path} is unreadable ({err}); the run folder is damaged"
            ) from err

    def config_dict(self) -> dict[str, Any]:
        """The run's config as a JSON-ready dict, with every field: fields added to lad-fast after the
        run was written take their defaults (what the run was trained with), so comparing it with a
        current config names real differences only."""
        return config_to_dict(self.config())

    def config(self) -> LadConfig:
        """The resolved config this run was (last) trained with.

        Read and parsed on the first call only, so every reader of one opened run (the loaders of its
        models, generation, evaluation) shares one config; open the run again to see a rewritten one.
        """
        if self._config is None:
            try:
                self._config = config_from_dict(self._raw_config())
            except (ConfigError, TypeError) as err:
                raise CheckpointError(f"{self.config_path} does not hold a lad-fast config: {err}") from err
        return self._config

    # -- model folders and the log ----------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        """``<run>/<model>/`` for one of :data:`MODELS` (not created here)."""
        if model not in MODELS:
            raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
        return self.path / model

    def clear_model(self, model: str) -> None:
        """Remove one model's checkpoints (``--force``) and its lines in ``log.jsonl``.

        Only what lad-fast writes in ``<run>/<model>/`` goes: the step folders, the ``latest`` pointer,
        temporaries of killed writes, the diffusion latent cache and the VQ-GAN's ``previews/step-*.png``.
        Anything else there (a user's notes, say) stays, and so does the folder then.
        """
        from lad_fast.runs.checkpoints import POINTER, clean_leftovers, is_step_dir_name

        d = self.model_dir(model)
        if d.is_dir():
            clean_leftovers(d)
            for p in d.iterdir():
                if p.is_dir() and not p.is_symlink() and is_step_dir_name(p.name):
                    shutil.rmtree(p)
                elif p.name in (POINTER, *_MODEL_CACHES) and p.is_file():
                    p.unlink()
                elif p.name == "previews" and p.is_dir():
                    for q in p.iterdir():
                        if _PREVIEW_RE.fullmatch(q.name) and q.is_file():
                            q.unlink()
            for folder in (d / "previews", d):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when nothing else is left in it
        self.truncate_log(model, after_step=-1)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``log.jsonl`` (fsynced)."""
        append_line(self.log_path, json.dumps(record, sort_keys=False))

    def _log_lines(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` of every line of ``log.jsonl``; a line that is not JSON (one torn by a kill
        mid-append) is skipped. CheckpointError naming the file and line for bytes that are not UTF-8 or
        a record that is not an object with a string ``model`` and an integer ``step`` (when it has one),
        so a damaged line is neither trusted nor copied forward by :meth:`truncate_log`."""
        try:
            raw = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise CheckpointError(
                f"{self.log_path} is unreadable ({err.strerror or err}); check the file"
            ) from err
        out = []
        for n, blob in enumerate(raw.splitlines(), start=1):
            try:
                line = blob.decode("utf-8")
            except UnicodeDecodeError:
                what = "bytes that are not UTF-8"
            else:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill mid-append
                step = rec.get("step", 0) if isinstance(rec, dict) else None
                if isinstance(rec, dict) and isinstance(rec.get("model"), str) and type(step) is int:
                    out.append((line, rec))
                    continue
                what = 'a line that is not a log record ({"model": ..., "step": N, ...})'
            raise CheckpointError(
                f"{self.log_path}: line {n} holds {what}; the log was edited or damaged: delete that line "
                "(or the whole log, which only records training) and rerun"
            )
        return out

    def read_log(self, model: str | None = None) -> list[dict[str, Any]]:
        """The parsed lines of ``log.jsonl`` (of one model when given); a torn last line is skipped,
        a damaged one refused (:meth:`_log_lines`)."""
        return [rec for _, rec in self._log_lines() if model is None or rec["model"] == model]

    def truncate_log(self, model: str, after_step: int) -> None:
        """Drop ``model``'s lines with ``step > after_step`` (a resumed run rewrites those steps)."""
        if not self.log_path.exists():
            return
        keep = [
            line
            for line, rec in self._log_lines()
            if not (rec["model"] == model and rec.get("step", -1) > after_step)
        ]
        from lad_fast.utils.atomic import write_text

        write_text(self.log_path, "".join(k + "\n" for k in keep))


def latest_run(
    root: str | os.PathLike[str] = "runs", require: tuple[str, ...] = ("vqgan", "diffusion")
) -> Path:
    """The most recently updated run under ``root`` with a complete checkpoint of every ``require`` model.

    Used by ``generate`` without ``--run``. Raises CheckpointError when there is none.
    """
    from lad_fast.runs.checkpoints import latest_step_dir

    root = Path(root)
    best: tuple[float, Path] | None = None
    if root.is_dir():
        for path in root.iterdir():
            if not (path / CONFIG_NAME).is_file():
                continue
            stamps = []
            for model in require:
                step_dir = latest_step_dir(path / model)
                if step_dir is None:
                    break
                stamps.append((step_dir / "meta.json").stat().st_mtime)
            else:
                stamp = max(stamps, default=(path / CONFIG_NAME).stat().st_mtime)
                if best is None or stamp > best[0]:
                    best = (stamp, path)
    if best is None:
        raise CheckpointError(
            f"no complete run under {root}/ (one with {' and '.join(require)} checkpoints); "
            "train one first or pass --run"
        )
    return best[1]
