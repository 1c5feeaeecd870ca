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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lad_fast.config import LadConfig, TrainConfig, config_to_dict
from lad_fast.data.labels import CANONICAL_ORGANS, NUM_CLASSES
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import ConfigError, InputError
from lad_fast.models.segmenter import Segmenter
from lad_fast.ssl.settings import FINETUNE, PRETRAIN, SSLConfig, train_config
from lad_fast.train.data import PreparedBatches, training_dataset
from lad_fast.train.loop import Job, Phase, Setup, TrainResult, train
from lad_fast.train.schedule import lr_factor, make_adamw, make_scheduler
from lad_fast.train.segmenter import (
    SegmentationLoss,
    SegmenterBatches,
    evaluate_segmenter,
    labelled_split,
)

DICE_JSON = "dice.json"
CURVE_JSONL = "curve.jsonl"


def held_out_cases(dataset: PreparedDataset) -> list[int]:
    """The labelled cases fine-tuning scores on (none when no case has a mask)."""
    return labelled_split(dataset)[1] if dataset.labelled_indices() else []


def case_indices(
    dataset: PreparedDataset, ids: Sequence[str], allowed: Sequence[int], what: str
) -> list[int]:
    """Dataset indices of the case ``ids`` (in their order); InputError for an id that is not a case of
    ``dataset``, is not among the ``allowed`` indices (held out, or without a mask), or comes twice."""
    index = {c: i for i, c in enumerate(dataset.case_ids)}
    unknown = [c for c in ids if c not in index]
    refused = [c for c in ids if c in index and index[c] not in set(allowed)]
    if unknown or refused or len(set(ids)) != len(ids) or not ids:
        shown = ", ".join(dataset.case_ids[i] for i in allowed[:5]) + (" ..." if len(allowed) > 5 else "")
        why = (f"no such case: {', '.join(unknown)}" if unknown else f"cannot {what}: {', '.join(refused)}"
               if refused else "no case, or a case named twice")  # fmt: skip
        raise InputError(f"{dataset.path}: --cases {','.join(ids)}: {why}; choose among {shown}")
    return [index[c] for c in ids]


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


# ------------------------------------------------------------------------------------------- pretrain


@dataclass(frozen=True)
class _PretrainLoss:
    """The pretraining phase loss, ``loss(modules, batch, step)``: inpainting L1 on the masked voxels plus
    ``rotation_weight`` times the rotation cross-entropy, plus ``contrastive_weight`` times the NT-Xent
    loss between the batch's two views when it is > 0 (:mod:`lad_fast.ssl.objectives`)."""

    device: torch.device
    rotation_weight: float
    contrastive_weight: float = 0.0
    temperature: float = 0.5

    def __call__(self, mods: Mapping[str, torch.nn.Module], batch: dict[str, Any], step: int):
        from lad_fast.ssl.objectives import contrastive_loss, inpainting_loss, rotation_loss

        x = batch["input"].to(self.device)
        if self.contrastive_weight > 0:
            rec, logits, z1, z2 = mods["model"](x, batch["view"].to(self.device))
        else:
            rec, logits = mods["model"](x)
        l_rec = inpainting_loss(rec, batch["target"].to(self.device), batch["mask"])
        l_rot = rotation_loss(logits, batch["rotation"])
        acc = (logits.argmax(1).cpu() == batch["rotation"]).float().mean()
        logs = {"inpainting": l_rec.detach(), "rotation": l_rot.detach(), "rotation_acc": acc,
                "synthetic_fraction": batch["synthetic"].float().mean()}  # fmt: skip
        total = l_rec + self.rotation_weight * l_rot
        if self.contrastive_weight > 0:
            l_con = contrastive_loss(z1, z2, self.temperature)
            logs["contrastive"] = l_con.detach()
            total = total + self.contrastive_weight * l_con
        return total, logs


def _ssl_json(ssl: SSLConfig) -> dict[str, Any]:
    """The SSL settings a checkpoint records; without the contrastive fields while the term is off, so a
    run of the default recipe records (and resumes with) what it recorded before the term existed."""
    out = _json(ssl)
    if ssl.contrastive_weight == 0:
        for key in ("contrastive_weight", "contrastive_temperature", "contrastive_dim"):
            out.pop(key)
    return out


@dataclass(frozen=True)
class _Pool:
    """What pretraining reads: the real cases (``real``: dataset indices, ``held``: the fine-tuning
    held-out cases left out) and the generated volumes (``synthetic``, from ``folders``), and the hash of
    them all (``digest``, the run's ``data_hash``)."""

    dataset: PreparedDataset
    real: list[int]
    held: set[int]
    synthetic: Any  # lad_fast.ssl.data.GeneratedVolumes | None
    folders: list[str]
    digest: str


def _pretrain_job(setup: Setup, cfg: LadConfig, tcfg: TrainConfig, ssl: SSLConfig, pool: _Pool) -> Job:
    """What the loop trains: :class:`lad_fast.ssl.network.SSLNet` (initial weights from the seed) with
    AdamW and its schedule, on mixed real and generated batches."""
    from lad_fast.ssl.data import SSLBatches
    from lad_fast.ssl.network import SSLNet

    with setup.initial_weights():
        contrast = ssl.contrastive_dim if ssl.contrastive_weight > 0 else 0
        net = SSLNet(cfg.segmenter, contrast=contrast).to(setup.device)
    opt = make_adamw(net, tcfg)
    loss = _PretrainLoss(
        setup.device, ssl.rotation_weight, ssl.contrastive_weight, ssl.contrastive_temperature
    )
    synthetic = pool.synthetic
    meta = {
        "preset": cfg.preset,
        "data_hash": pool.digest,
        "data": str(pool.dataset.path.resolve()),
        "real_cases": len(pool.real),
        "held_out_cases": [pool.dataset.case_ids[i] for i in sorted(pool.held)],
        "synthetic": pool.folders,
        "synthetic_volumes": len(synthetic) if synthetic is not None else 0,
        "synthetic_ratio": ssl.synthetic_ratio if synthetic is not None else 0.0,
    }
    return Job(
        {"model": net},
        [Phase("model", opt, loss, scheduler=make_scheduler(opt, tcfg))],
        SSLBatches(pool.dataset, pool.real, synthetic, tcfg.batch_size, tcfg.seed, ssl),
        model_config={"segmenter": _json(cfg.segmenter), "ssl": _ssl_json(ssl)},
        meta=meta,
    )


def pretrain(
    run: Path,
    cfg: LadConfig,
    data: PreparedDataset | Path | None = None,
    synthetic: Sequence[Path] = (),
    ssl: SSLConfig | None = None,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    stop_at: int | None = None,
    cases: Sequence[str] | None = None,
) -> TrainResult:
    """Pretrain the segmenter's U-Net of ``cfg`` into ``run/ssl/``.

    data: a prepared dataset at ``cfg.preset``, open or a folder (default: the built-in phantoms;
        :func:`lad_fast.train.data.training_dataset`); its images are the real pool (masks unused), less
        the labelled cases that fine-tuning holds out. synthetic: folders written by ``lad-fast generate``
        on the same preset grid (InputError otherwise), mixed in at ``ssl.synthetic_ratio``. steps / seed
        override the preset's budget (:data:`PRETRAIN`). cases: the ids of the real cases to pretrain on
        (a scarce pool); default every case but the held-out ones. InputError for an unknown or held-out id.
    """
    from lad_fast.ssl.data import GeneratedVolumes

    ssl = ssl or SSLConfig()
    tcfg = train_config(PRETRAIN, cfg.preset, steps, seed)
    dataset = training_dataset(data, cfg)
    held = set(held_out_cases(dataset))
    real = [i for i in range(len(dataset)) if i not in held]
    if cases is not None:
        real = case_indices(
            dataset, cases, allowed=real, what="pretrain on (held out for the fine-tuning Dice)"
        )
    generated = GeneratedVolumes([Path(s) for s in synthetic], dataset.geometry) if synthetic else None
    folders = [str(Path(s).resolve()) for s in synthetic]
    chosen = (
        [sorted(dataset.case_ids[i] for i in real)] if cases is not None else []
    )  # the default hashes as before
    digest = hashlib.sha256(
        json.dumps([dataset.content_hash(masks=False), folders, len(generated or []), *chosen]).encode()
    ).hexdigest()
    pool = _Pool(dataset, real, held, generated, folders, digest)
    build = partial(_pretrain_job, cfg=cfg, tcfg=tcfg, ssl=ssl, pool=pool)
    return train(
        run, cfg, "ssl", tcfg, build, resume=resume, force=force, device=device, stop_at=stop_at,
        data_hash=digest,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- finetune


def finetune_cases(
    dataset: PreparedDataset, labelled: int, cases: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """(the K = ``labelled`` training cases, the held-out cases); InputError when K does not fit.

    cases: the ids of the K training cases (as many as ``labelled``, labelled and not held out); default
    the first K labelled cases of the train split, in index order.
    """
    train_idx, val_idx = labelled_split(dataset)
    if labelled < 1 or labelled > len(train_idx) or set(train_idx) & set(val_idx):
        raise InputError(
            f"--labelled {labelled}: {dataset.path} has {len(train_idx)} labelled case(s) besides the "
            f"{len(val_idx)} held out for the Dice; choose K between 1 and {len(train_idx)}"
            + (" (it needs at least 2 labelled cases)" if set(train_idx) & set(val_idx) else "")
        )
    if cases is None:
        return train_idx[:labelled], val_idx
    if len(cases) != labelled:
        raise InputError(f"--cases names {len(cases)} case(s) but --labelled is {labelled}; name K cases")
    return case_indices(
        dataset, cases, allowed=train_idx, what="fine-tune on (held out or unlabelled)"
    ), val_idx


def initial_segmenter(
    cfg: LadConfig,
    seed: int,
    pretrained: dict[str, torch.Tensor] | None,
    source: str = "",
    transfer: str = "all",
):
    """(the fine-tuning segmenter before its first step, the weight transfer or None). Fresh weights come
    from ``seed`` alone, so a pretrained start differs from none only in the transferred layers
    (``transfer``: all of the U-Net or its encoder, :func:`lad_fast.ssl.network.transfer_weights`)."""
    from lad_fast.ssl.network import transfer_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Segmenter(cfg.segmenter, NUM_CLASSES)
    if pretrained is None:
        return net, None
    return net, transfer_weights(pretrained, net, source, transfer)


@dataclass
class _FinetuneReport:
    """After the last step: the per-organ Dice of the fine-tuned weights on the held-out cases, logged and
    written to ``run/finetune/dice.json`` (and ``out``); ``scores`` keeps them for the caller (rank 0)."""

    setup: Setup
    net: Segmenter
    dataset: PreparedDataset
    chosen: list[int]
    held: list[int]
    pretrained: Path | None
    pretrained_meta: dict[str, Any]
    seed: int
    out: Path | None
    scores: dict[str, Any]

    def finish(self, result: TrainResult) -> None:
        from lad_fast.utils.atomic import write_json

        scores, pretrained = self.scores, self.pretrained
        extra = self.pretrained_meta.get("extra", {})
        scores.update(evaluate_segmenter(self.net.eval(), self.dataset, self.held, self.setup.device))
        scores.update(
            held_out=not set(self.held) & set(self.chosen), labelled=len(self.chosen), steps=result.step,
            seed=self.seed, pretrained=str(pretrained) if pretrained is not None else None,
            train_cases=[self.dataset.case_ids[i] for i in self.chosen],
            curve=read_curve(self.setup.run.path),
            pretrained_meta={k: extra.get(k) for k in ("synthetic", "synthetic_volumes", "synthetic_ratio",
                             "real_cases")} if pretrained is not None else None,
        )  # fmt: skip
        self.setup.run.log({"model": "finetune", "event": "eval", **scores})
        write_json(self.setup.run.model_dir("finetune") / DICE_JSON, scores)
        if self.out is not None:
            write_json(self.out, scores)


def read_curve(run: Path) -> list[dict[str, Any]]:
    """The learning curve of a fine-tuning run: ``[{"step", "dice": {organ: held-out Dice}}]`` by step, one
    entry per checkpoint (``eval_every``); a step evaluated twice (after a resume) counts once."""
    path = Path(run) / "finetune" / CURVE_JSONL
    points: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                point = json.loads(line)
                points[int(point["step"])] = point
    return [points[k] for k in sorted(points)]


@dataclass
class _CurvePoint:
    """``meta(step)`` of the fine-tuning job: at each checkpoint, the held-out Dice of the weights so far,
    appended to ``run/finetune/curve.jsonl`` (the learning curve), with the job's fixed meta returned.
    Evaluation reads no random numbers and the network has no batch statistics, so training is the same
    with or without it."""

    net: Segmenter
    dataset: PreparedDataset
    held: list[int]
    setup: Setup
    fixed: dict[str, Any]

    def __call__(self, step: int) -> dict[str, Any]:
        scores = evaluate_segmenter(self.net.eval(), self.dataset, self.held, self.setup.device)
        self.net.train()
        point = {"step": step, "dice": scores["dice"]}
        path = self.setup.run.model_dir("finetune") / CURVE_JSONL
        path.parent.mkdir(parents=True, exist_ok=True)  # the first checkpoint is written after its meta
        with open(path, "a") as f:
            f.write(json.dumps(point) + "\n")
        return {**self.fixed, "held_out_dice": scores["dice"]}


def finetune_optimizer(
    net: Segmenter, tcfg: TrainConfig, transferred: Sequence[str], lr_scale: float, freeze_steps: int = 0
) -> torch.optim.AdamW:
    """AdamW over the segmenter, the ``transferred`` (pretrained) weights at ``lr_scale`` times the peak
    learning rate (a gentler start for what pretraining learnt; 1 = one rate for all), the rest at it:
    two parameter groups, pretrained first, whenever their rates or schedules differ (``lr_scale`` != 1
    or ``freeze_steps`` > 0, :func:`finetune_scheduler`), else one."""
    if (lr_scale == 1.0 and freeze_steps == 0) or not transferred:
        return make_adamw(net, tcfg)
    names = set(transferred)
    params = dict(net.named_parameters())
    pre = [p for n, p in params.items() if n in names and p.requires_grad]
    rest = [p for n, p in params.items() if n not in names and p.requires_grad]
    groups = [{"params": pre, "lr": tcfg.lr * lr_scale}, {"params": rest, "lr": tcfg.lr}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)


def finetune_scheduler(
    opt: torch.optim.Optimizer, tcfg: TrainConfig, freeze_steps: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The segmenter's schedule; with ``freeze_steps`` > 0 and a pretrained group (the first of
    :func:`finetune_optimizer`'s two), that group is frozen then unfrozen: learning rate 0 for the first
    ``freeze_steps`` steps (AdamW moves no weight at rate 0, weight decay included, so only the fresh
    layers learn, on the pretrained features), then the schedule, ramped up linearly over the schedule's
    warm-up length (at least 1 step) so the unfrozen weights are not hit by the full rate at once.
    A pure function of the step, so a resumed run follows the same curve."""
    if freeze_steps == 0 or len(opt.param_groups) == 1:
        return make_scheduler(opt, tcfg)
    base = lr_factor(tcfg)
    ramp = max(1, round(tcfg.warmup_fraction * tcfg.steps))

    def pretrained(step: int) -> float:
        if step < freeze_steps:
            return 0.0
        return base(step) * min(1.0, (step - freeze_steps + 1) / ramp)

    return torch.optim.lr_scheduler.LambdaLR(opt, [pretrained, base])


@dataclass(frozen=True)
class _Labels:
    """What fine-tuning reads: the dataset, its K training cases (``chosen``) and held-out cases, and the
    pretrained start (``state``: an SSLNet state dict, or None; ``meta``: its checkpoint's)."""

    dataset: PreparedDataset
    chosen: list[int]
    held: list[int]
    pretrained: Path | None
    state: dict[str, torch.Tensor] | None
    meta: dict[str, Any]
    transfer: str = "all"


def _finetune_job(
    setup: Setup,
    cfg: LadConfig,
    tcfg: TrainConfig,
    labels: _Labels,
    report: dict[str, Any],
    out: Path | None,
    eval_every: int,
    lr_scale: float,
    freeze_steps: int = 0,
) -> Job:
    """What the loop trains: the segmenter (pretrained layers transferred, the rest from the seed) with
    the segmenter's loss, schedule and augmentation on the K chosen cases; the Dice report at the end
    fills ``report``. ``eval_every`` > 0: a learning-curve point at every checkpoint (every that many
    steps). ``lr_scale``, ``freeze_steps``: see :func:`finetune_optimizer`, :func:`finetune_scheduler`."""
    dev, dataset, pretrained = setup.device, labels.dataset, labels.pretrained
    net, transfer = initial_segmenter(cfg, setup.seed, labels.state, str(pretrained), labels.transfer)
    net = net.to(dev)
    loaded = transfer.loaded if transfer is not None else ()
    opt = finetune_optimizer(net, tcfg, loaded, lr_scale, freeze_steps)
    source = PreparedBatches(dataset, tcfg.batch_size, tcfg.seed, labels.chosen, require_mask=True)
    finish = _FinetuneReport(
        setup, net, dataset, labels.chosen, labels.held, pretrained, labels.meta, tcfg.seed, out, report
    ).finish
    meta = {
        "preset": cfg.preset,
        "data_hash": dataset.content_hash(),
        "data": str(dataset.path.resolve()),
        "organs": list(CANONICAL_ORGANS),
        "labelled": len(labels.chosen),
        "train_cases": [dataset.case_ids[i] for i in labels.chosen],
        "held_out_cases": [dataset.case_ids[i] for i in labels.held],
        "pretrained": str(Path(pretrained).resolve()) if pretrained is not None else None,
        "transferred": len(transfer.loaded) if transfer is not None else 0,
        "pretrained_lr_scale": lr_scale,
        "freeze_steps": freeze_steps,
        "transfer": labels.transfer if pretrained is not None else None,
    }
    curve = _CurvePoint(net, dataset, labels.held, setup, meta) if eval_every > 0 else None
    return Job(
        {"model": net},
        [Phase("model", opt, SegmentationLoss(dev), scheduler=finetune_scheduler(opt, tcfg, freeze_steps))],
        SegmenterBatches(source, tcfg.seed, dataset.geometry.hu_window),
        model_config={"segmenter": config_to_dict(cfg.segmenter), "num_classes": NUM_CLASSES},
        meta=curve if curve is not None else meta,
        finish=finish,
    )


def finetune(
    run: Path,
    cfg: LadConfig,
    pretrained: Path | None,
    labels: PreparedDataset | Path | None = None,
    labelled: int = 2,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    out: Path | None = None,
    cases: Sequence[str] | None = None,
    eval_every: int = 0,
    pretrained_lr_scale: float = 1.0,
    transfer: str = "all",
    freeze_steps: int = 0,
) -> dict[str, Any]:
    """Fine-tune a segmenter on K = ``labelled`` cases of ``labels`` into ``run/finetune/``; returns the
    held-out scores ``{"dice": {organ: Dice}, "dice_pooled": ..., "cases": n, ...}``, also written to
    ``run/finetune/dice.json`` (and ``out`` when given).

    pretrained: a run holding ``ssl/`` (CheckpointError when it does not, or for another architecture),
    or None for a fresh start. labels: a prepared dataset with masks, open or a folder (default: the
    built-in phantoms; :func:`lad_fast.train.data.training_dataset`). cases: the ids of the K training
    cases (default the first K; :func:`finetune_cases`). eval_every > 0: score the held-out cases every
    that many steps (a checkpoint each time) into ``run/finetune/curve.jsonl``, returned as ``"curve"``.
    pretrained_lr_scale: the transferred weights' learning rate relative to the rest
    (:func:`finetune_optimizer`; no effect without ``pretrained``). transfer: ``"all"`` (every U-Net
    weight but the output layer) or ``"encoder"`` (the decoder starts fresh), as
    :func:`lad_fast.ssl.network.transfer_weights`. freeze_steps: the transferred weights stay as
    pretrained for that many steps while the fresh layers learn, then fine-tune too
    (:func:`finetune_scheduler`; 0: never frozen; no effect without ``pretrained``).
    """
    from lad_fast.ssl.pretrained import load_pretrained

    if eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0 (0: no learning curve), got {eval_every}")
    if not pretrained_lr_scale > 0:
        raise ConfigError(f"--pretrained-lr-scale must be > 0, got {pretrained_lr_scale}")
    if not 0 <= freeze_steps:
        raise ConfigError(f"--freeze-steps must be >= 0 (0: never frozen), got {freeze_steps}")
    from lad_fast.ssl.network import check_transfer

    check_transfer(transfer)  # before the data is opened or the run folder made
    tcfg = train_config(FINETUNE, cfg.preset, steps, seed)
    if eval_every > 0:
        tcfg = dataclasses.replace(tcfg, checkpoint_every=eval_every)
    dataset = training_dataset(labels, cfg)
    chosen, held = finetune_cases(dataset, labelled, cases)
    state, pmeta = load_pretrained(Path(pretrained), cfg.segmenter) if pretrained is not None else (None, {})
    curve = Path(run) / "finetune" / CURVE_JSONL
    if force or not (Path(run) / "finetune" / "latest").is_file():  # a fresh start: no stale curve points
        curve.unlink(missing_ok=True)
    scores: dict[str, Any] = {}
    sources = _Labels(dataset, chosen, held, pretrained, state, pmeta, transfer)
    build = partial(_finetune_job, cfg=cfg, tcfg=tcfg, labels=sources, report=scores, out=out,
                    eval_every=eval_every, lr_scale=pretrained_lr_scale,
                    freeze_steps=freeze_steps)  # fmt: skip
    result = train(run, cfg, "finetune", tcfg, build, resume=resume, force=force, device=device)
    if not scores:  # another rank, or finished by an earlier call: read what rank 0 wrote
        path = Path(run) / "finetune" / DICE_JSON
        if path.is_file():
            scores = json.loads(path.read_text())
    scores.setdefault("steps", result.step)
    return scores
