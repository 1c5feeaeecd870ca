"""Self-supervised pretraining (``lad-fast ssl pretrain``) and few-label fine-tuning (``ssl finetune``).

Both run :func:`lad_fast.train.loop.train` (resume, DDP, progress, ``log.jsonl``) as models ``"ssl"`` and
``"finetune"`` of a run folder whose ``config.json`` is the preset's.

* Pretraining: :class:`lad_fast.ssl.network.SSLNet` on masked-volume inpainting + rotation prediction
  (:mod:`lad_fast.ssl.objectives` says why), over the real cases of ``--data`` less the labelled cases
  fine-tuning holds out (so no test image is seen, even unlabelled), mixed with generated volumes.
* Fine-tuning: the segmenter (:class:`lad_fast.models.segmenter.Segmenter`) with the segmenter's loss and
  augmentation, on the first K labelled cases of the train split (index order, so every arm and seed
  sees the same K); a pretrained start differs from ``--pretrained none`` only in the initial weights of
  the transferred layers. Per-organ Dice on the held-out split goes to ``<run>/finetune/dice.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lad_fast.config import LadConfig, config_to_dict
from lad_fast.data.labels import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.models.segmenter import Segmenter, dice_loss
from lad_fast.ssl.settings import FINETUNE, PRETRAIN, SSLConfig, train_config
from lad_fast.train.loop import Job, Phase, Setup, TrainResult, train
from lad_fast.train.schedule import make_adamw, make_scheduler

DICE_JSON = "dice.json"


def _dataset(data: Path | None, cfg: LadConfig) -> tuple[Path, PreparedDataset]:
    from lad_fast.data.cache import phantom_dataset

    path = Path(data) if data is not None else phantom_dataset(cfg.preset)
    return path, PreparedDataset(path, expect_preset=cfg.preset)


def held_out_cases(dataset: PreparedDataset) -> list[int]:
    """The labelled cases fine-tuning scores on (none when no case has a mask)."""
    from lad_fast.train.segmenter import labelled_split

    return labelled_split(dataset)[1] if dataset.labelled_indices() else []


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


# ------------------------------------------------------------------------------------------- pretrain


def pretrain(
    run: Path,
    cfg: LadConfig,
    data: Path | None = None,
    synthetic: Sequence[Path] = (),
    ssl: SSLConfig | None = None,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    stop_at: int | None = None,
) -> TrainResult:
    """Pretrain the segmenter's U-Net of ``cfg`` into ``run/ssl/``.

    data: a prepared dataset at ``cfg.preset`` (default: the built-in phantoms); its images are the real
        pool (masks unused), less the labelled cases that fine-tuning holds out. synthetic: folders
        written by ``lad-fast generate`` on the same preset grid (InputError otherwise), mixed in at
        ``ssl.synthetic_ratio``. steps / seed override the preset's budget (:data:`PRETRAIN`).
    """
    from lad_fast.ssl.data import GeneratedVolumes, SSLBatches
    from lad_fast.ssl.network import SSLNet
    from lad_fast.ssl.objectives import inpainting_loss, rotation_loss

    ssl = ssl or SSLConfig()
    tcfg = train_config(PRETRAIN, cfg.preset, steps, seed)
    data, dataset = _dataset(data, cfg)
    held = set(held_out_cases(dataset))
    real = [i for i in range(len(dataset)) if i not in held]
    pool = GeneratedVolumes([Path(s) for s in synthetic], dataset.geometry) if synthetic else None
    folders = [str(Path(s).resolve()) for s in synthetic]
    digest = hashlib.sha256(
        json.dumps([dataset.content_hash(masks=False), folders, len(pool or [])]).encode()
    )

    def build(setup: Setup) -> Job:
        dev = setup.device
        with setup.initial_weights():
            net = SSLNet(cfg.segmenter).to(dev)
        opt = make_adamw(net, tcfg)

        def loss(mods: Mapping[str, torch.nn.Module], batch: dict[str, Any], step: int):
            rec, logits = mods["model"](batch["input"].to(dev))
            l_rec = inpainting_loss(rec, batch["target"].to(dev), batch["mask"])
            l_rot = rotation_loss(logits, batch["rotation"])
            acc = (logits.argmax(1).cpu() == batch["rotation"]).float().mean()
            logs = {"inpainting": l_rec.detach(), "rotation": l_rot.detach(), "rotation_acc": acc,
                    "synthetic_fraction": batch["synthetic"].float().mean()}  # fmt: skip
            return l_rec + ssl.rotation_weight * l_rot, logs

        meta = {
            "preset": cfg.preset,
            "data_hash": digest.hexdigest(),
            "data": str(data.resolve()),
            "real_cases": len(real),
            "held_out_cases": [dataset.case_ids[i] for i in sorted(held)],
            "synthetic": folders,
            "synthetic_volumes": len(pool) if pool is not None else 0,
            "synthetic_ratio": ssl.synthetic_ratio if pool is not None else 0.0,
        }
        return Job(
            {"model": net},
            [Phase("model", opt, loss, scheduler=make_scheduler(opt, tcfg))],
            SSLBatches(dataset, real, pool, tcfg.batch_size, tcfg.seed, ssl),
            model_config={"segmenter": _json(cfg.segmenter), "ssl": _json(ssl)},
            meta=meta,
        )

    return train(
        run, cfg, "ssl", tcfg, build, resume=resume, force=force, device=device, stop_at=stop_at,
        data_hash=digest.hexdigest(),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- finetune


def finetune_cases(dataset: PreparedDataset, labelled: int) -> tuple[list[int], list[int]]:
    """(the K = ``labelled`` training cases, the held-out cases); InputError when K does not fit."""
    from lad_fast.train.segmenter import labelled_split

    train_idx, val_idx = labelled_split(dataset)
    if labelled < 1 or labelled > len(train_idx) or set(train_idx) & set(val_idx):
        raise InputError(
            f"--labelled {labelled}: {dataset.path} has {len(train_idx)} labelled case(s) besides the "
            f"{len(val_idx)} held out for the Dice; choose K between 1 and {len(train_idx)}"
            + (" (it needs at least 2 labelled cases)" if set(train_idx) & set(val_idx) else "")
        )
    return train_idx[:labelled], val_idx


def initial_segmenter(
    cfg: LadConfig, seed: int, pretrained: dict[str, torch.Tensor] | None, source: str = ""
):
    """(the fine-tuning segmenter before its first step, the weight transfer or None). Fresh weights come
    from ``seed`` alone, so a pretrained start differs from none only in the transferred layers."""
    from lad_fast.ssl.network import transfer_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Segmenter(cfg.segmenter, NUM_CLASSES)
    return net, (transfer_weights(pretrained, net, source) if pretrained is not None else None)


def finetune(
    run: Path,
    cfg: LadConfig,
    pretrained: Path | None,
    labels: Path | None = None,
    labelled: int = 2,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    out: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune a segmenter on K = ``labelled`` cases of ``labels`` into ``run/finetune/``; returns the
    held-out scores ``{"dice": {organ: Dice}, "dice_pooled": ..., "cases": n, ...}``, also written to
    ``run/finetune/dice.json`` (and ``out`` when given).

    pretrained: a run holding ``ssl/`` (CheckpointError when it does not, or for another architecture),
    or None for a fresh start. labels: a prepared dataset with masks (default: the built-in phantoms).
    """
    from lad_fast.ssl.pretrained import load_pretrained
    from lad_fast.train.data import PreparedBatches
    from lad_fast.train.segmenter import SegmenterBatches, evaluate_segmenter
    from lad_fast.utils.atomic import write_json

    tcfg = train_config(FINETUNE, cfg.preset, steps, seed)
    labels, dataset = _dataset(labels, cfg)
    chosen, held = finetune_cases(dataset, labelled)
    state, pmeta = load_pretrained(Path(pretrained), cfg.segmenter) if pretrained is not None else (None, {})
    scores: dict[str, Any] = {}

    def build(setup: Setup) -> Job:
        dev = setup.device
        net, transfer = initial_segmenter(cfg, setup.seed, state, str(pretrained))
        net = net.to(dev)
        opt = make_adamw(net, tcfg)

        def loss(mods: Mapping[str, torch.nn.Module], batch: dict[str, torch.Tensor], step: int):
            return dice_loss(mods["model"](batch["image"].to(dev)), batch["mask"].to(dev)), {}

        source = PreparedBatches(dataset, tcfg.batch_size, tcfg.seed, chosen, require_mask=True)

        def finish(result: TrainResult) -> None:
            scores.update(evaluate_segmenter(net.eval(), dataset, held, dev))
            scores.update(
                held_out=not set(held) & set(chosen), labelled=labelled, steps=result.step, seed=tcfg.seed,
                pretrained=str(pretrained) if pretrained is not None else None,
                pretrained_meta={k: pmeta.get("extra", {}).get(k) for k in ("synthetic", "synthetic_volumes",
                                 "synthetic_ratio", "real_cases")} if pretrained is not None else None,
            )  # fmt: skip
            setup.run.log({"model": "finetune", "event": "eval", **scores})
            write_json(setup.run.model_dir("finetune") / DICE_JSON, scores)
            if out is not None:
                write_json(out, scores)

        meta = {
            "preset": cfg.preset,
            "data_hash": dataset.content_hash(),
            "data": str(labels.resolve()),
            "organs": list(CANONICAL_ORGANS),
            "labelled": labelled,
            "train_cases": [dataset.case_ids[i] for i in chosen],
            "held_out_cases": [dataset.case_ids[i] for i in held],
            "pretrained": str(Path(pretrained).resolve()) if pretrained is not None else None,
            "transferred": len(transfer.loaded) if transfer is not None else 0,
        }
        return Job(
            {"model": net},
            [Phase("model", opt, loss, scheduler=make_scheduler(opt, tcfg))],
            SegmenterBatches(source, tcfg.seed, dataset.geometry.hu_window),
            model_config={"segmenter": config_to_dict(cfg.segmenter), "num_classes": NUM_CLASSES},
            meta=meta,
            finish=finish,
        )

    result = train(run, cfg, "finetune", tcfg, build, resume=resume, force=force, device=device)
    if not scores:  # another rank, or finished by an earlier call: read what rank 0 wrote
        path = Path(run) / "finetune" / DICE_JSON
        if path.is_file():
            scores = json.loads(path.read_text())
    scores.setdefault("steps", result.step)
    return scores
