"""Reading an SSL pretraining run: its weights, checked against the segmenter that will fine-tune them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lad_fast.config import SegmenterConfig, config_to_dict
from lad_fast.errors import CheckpointError

MODEL = "ssl"


def load_pretrained(run: Path, segmenter: SegmenterConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the :class:`lad_fast.ssl.network.SSLNet` state dict of ``run/ssl/``'s latest checkpoint, its meta).

    Raises CheckpointError when ``run`` holds no complete SSL checkpoint, or one pretrained for another
    segmenter architecture (another preset), before anything is trained.
    """
    from lad_fast.runs.checkpoints import load_checkpoint

    run = Path(run)
    ckpt = load_checkpoint(run / MODEL, MODEL) if (run / MODEL).is_dir() else None
    if ckpt is None:
        raise CheckpointError(
            f"{run}: no SSL pretraining checkpoint in {run / MODEL}; run `lad-fast ssl pretrain --run {run}` "
            "first, or pass --pretrained none"
        )
    theirs = ckpt.meta.get("model_config", {}).get("segmenter")
    mine = json.loads(json.dumps(config_to_dict(segmenter)))
    if theirs != mine:
        raise CheckpointError(
            f"{run}: pretrained with another segmenter architecture ({theirs}, this preset's is {mine}); "
            "pretrain with the same --preset as the fine-tuning"
        )
    return ckpt.tensors("model"), ckpt.meta
