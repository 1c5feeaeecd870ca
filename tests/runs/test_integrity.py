"""Every file of a checkpoint step is covered by its content hash, and the files a run holds that
lad-fast parses (``latest``, ``meta.json``, ``digest``, ``log.jsonl``) are refused in one line when
damaged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _shared import small_config

from lad_fast.errors import CheckpointError
from lad_fast.runs.checkpoints import (
    DIGEST_NAME,
    META_NAME,
    digest_hash,
    files_hash,
    load_checkpoint,
    read_step_meta,
    save_checkpoint,
)
from lad_fast.runs.loading import checkpoint_hash
from lad_fast.runs.rundir import RunDir


def _save(model_dir: Path, norm: float = 0.25, step: int = 3) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(
        model_dir,
        step,
        modules={"model": torch.nn.Linear(3, 2)},
        state={"step": step},
        meta={"model": "diffusion", "extra": {"latent_norm": {"mean": [norm], "std": [1.5]}}},
    )


def test_the_digest_lists_every_file_and_its_hash_is_the_checkpoint_hash(tmp_path):
    step = _save(tmp_path / "diffusion")
    listed = [line.split("  ")[1] for line in (step / DIGEST_NAME).read_text().splitlines()]
    assert listed == sorted(p.name for p in step.iterdir() if p.name != DIGEST_NAME)
    assert META_NAME in listed and "state.pt" in listed and "model.safetensors" in listed
    ckpt = load_checkpoint(tmp_path / "diffusion", "diffusion")
    assert ckpt.content_hash == digest_hash(step) == checkpoint_hash(tmp_path / "diffusion")
    assert len(ckpt.content_hash) == 16


def test_two_checkpoints_with_the_same_weights_and_another_meta_have_other_hashes(tmp_path):
    a, b = _save(tmp_path / "a" / "diffusion", norm=0.25), _save(tmp_path / "b" / "diffusion", norm=0.26)
    meta_a, meta_b = (json.loads((p / META_NAME).read_text()) for p in (a, b))
    assert meta_a["files"]["model.safetensors"] == meta_b["files"]["model.safetensors"]
    assert digest_hash(a) != digest_hash(b)  # the weights alone would give one hash for both models


def test_one_flipped_digit_in_meta_json_is_refused_naming_the_file(tmp_path):
    step = _save(tmp_path / "diffusion", norm=0.25)
    meta = step / META_NAME
    meta.write_text(meta.read_text().replace("0.25", "0.35"))
    expected = rf"{meta} was changed after the checkpoint was written .*restore it or train again"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path / "diffusion", "diffusion")
    with pytest.raises(CheckpointError, match=expected):
        read_step_meta(step)  # what export reads without loading weights


@pytest.mark.parametrize(
    "damage",
    [b"\xff\xfe", b"0" * 64 + b"  meta.json\n", b"not a digest\n"],
    ids=["not-utf8", "one-line-only", "garbage"],
)
def test_a_damaged_digest_is_refused_naming_it(tmp_path, damage):
    step = _save(tmp_path / "diffusion")
    (step / DIGEST_NAME).write_bytes(damage)
    with pytest.raises(CheckpointError, match=re.escape(str(step / DIGEST_NAME))):
        load_checkpoint(tmp_path / "diffusion", "diffusion")


def test_a_removed_digest_is_refused_but_a_checkpoint_written_before_digests_loads(tmp_path):
    step = _save(tmp_path / "diffusion")
    (step / DIGEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{step / DIGEST_NAME} is missing \(the checkpoint's format"):
        load_checkpoint(tmp_path / "diffusion", "diffusion")
    # the layout of an older lad-fast: format version 1, no digest; read, hashed by its weights' list
    meta = json.loads((step / META_NAME).read_text())
    (step / META_NAME).write_text(json.dumps({**meta, "format_version": 1}))
    ckpt = load_checkpoint(tmp_path / "diffusion", "diffusion")
    assert ckpt.content_hash == files_hash(meta["files"]) == checkpoint_hash(tmp_path / "diffusion")


def test_a_latest_pointer_with_bytes_that_are_not_utf8_is_one_line(tmp_path):
    _save(tmp_path / "diffusion")
    (tmp_path / "diffusion" / "latest").write_bytes(b"step-\xff\n")
    with pytest.raises(CheckpointError, match=r"latest is unreadable \(UnicodeDecodeError\); the run folder"):
        load_checkpoint(tmp_path / "diffusion", "diffusion")


# ------------------------------------------------------------------------------------------ log.jsonl


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (b'{"model": "vqgan", "step": 2, "loss": 0.\xff}', "bytes that are not UTF-8"),
        (b"[1]", "a line that is not a log record"),
        (b'{"model": "vqgan", "step": "2"}', "a line that is not a log record"),
        (b'{"step": 2}', "a line that is not a log record"),
    ],
    ids=["not-utf8", "list", "step-string", "no-model"],
)
def test_a_damaged_log_line_is_refused_naming_the_file_and_line_and_never_copied_forward(
    tmp_path, line, what
):
    run = RunDir.create(tmp_path / "run", small_config())
    run.log({"model": "vqgan", "step": 1})
    with open(run.log_path, "ab") as f:
        f.write(line + b"\n")
    run.log({"model": "vqgan", "step": 3})
    before = run.log_path.read_bytes()
    expected = rf"{run.log_path}: line 2 holds {what}.*delete that line"
    with pytest.raises(CheckpointError, match=expected):
        run.read_log("vqgan")
    with pytest.raises(CheckpointError, match=expected):
        run.truncate_log("vqgan", after_step=1)  # what train --resume does first
    assert run.log_path.read_bytes() == before


def test_a_torn_last_log_line_is_still_skipped_and_dropped(tmp_path):
    run = RunDir.create(tmp_path / "run", small_config())
    run.log({"model": "vqgan", "step": 1})
    run.log({"model": "diffusion", "step": 5})
    with open(run.log_path, "a") as f:
        f.write('{"model": "vqgan", "st')
    assert [r["step"] for r in run.read_log()] == [1, 5]
    run.truncate_log("vqgan", after_step=0)
    assert [json.loads(x) for x in run.log_path.read_text().splitlines()] == [
        {"model": "diffusion", "step": 5}
    ]
