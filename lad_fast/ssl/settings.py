"""Settings of self-supervised pretraining and few-label fine-tuning, and their budgets per preset.

They are not sections of :class:`lad_fast.config.LadConfig`: the SSL benchmark is a consumer of the
generator, not part of it, and a run's ``config.json`` stays the generator's. Each SSL run records them
in its checkpoint's ``meta.json`` (``model_config`` and ``extra``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lad_fast.config import TrainConfig
from lad_fast.errors import ConfigError


@dataclass(frozen=True)
class SSLConfig:
    """Masked-volume inpainting plus rotation prediction (see :mod:`lad_fast.ssl.objectives`).

    mask_grid: the volume is cut into this many (D, H, W) blocks; ``mask_ratio`` of them are replaced by
        noise and reconstructed. rotation_weight: weight of the rotation cross-entropy beside the L1
        reconstruction loss (Swin UNETR weighs its three losses equally; with two, 1 keeps that).
    synthetic_ratio: expected fraction of each batch drawn from the generated volumes (when any).
    contrastive_weight: weight of the contrastive (NT-Xent) loss between two views of each volume (0: off,
        no second view is drawn or encoded); contrastive_temperature its temperature, contrastive_dim
        the projection's width.
    """

    mask_grid: tuple[int, int, int] = (4, 8, 8)
    mask_ratio: float = 0.4
    noise_std: float = 0.5  # masked blocks hold N(0, std) noise (Swin UNETR's cut-out fill)
    rotation_weight: float = 1.0
    synthetic_ratio: float = 0.5
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.5
    contrastive_dim: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"ssl mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.synthetic_ratio <= 1.0:
            raise ConfigError(f"--synthetic-ratio must be in [0, 1], got {self.synthetic_ratio}")
        if not self.contrastive_weight >= 0.0:
            raise ConfigError(f"--contrastive-weight must be >= 0 (0: off), got {self.contrastive_weight}")
        if not self.contrastive_temperature > 0.0:
            raise ConfigError(f"ssl contrastive_temperature must be > 0, got {self.contrastive_temperature}")


# Budgets: at tiny a step is a batch of 4 volumes of 16 x 64 x 64 through the (16, 32, 64, 128) U-Net,
# small enough for a CPU. Fine-tuning is the segmenter's own recipe (peak lr 3e-3, warm-up, cosine),
# decaying to a tenth rather than a fiftieth so that short budgets keep learning to the end.
PRETRAIN = {
    "tiny": TrainConfig(
        steps=600, batch_size=4, lr=1e-3, betas=(0.9, 0.999), lr_schedule="cosine", warmup_fraction=0.05,
        final_lr_fraction=0.05, compile=False, checkpoint_every=200, preview_every=0,
    ),
    "lad": TrainConfig(
        steps=20_000, batch_size=2, lr=2e-4, betas=(0.9, 0.999), lr_schedule="cosine",
        warmup_fraction=0.02, final_lr_fraction=0.05, checkpoint_every=1000, preview_every=0,
    ),
}  # fmt: skip
FINETUNE = {
    "tiny": TrainConfig(
        steps=300, batch_size=2, lr=3e-3, betas=(0.9, 0.999), lr_schedule="cosine", warmup_fraction=0.05,
        final_lr_fraction=0.1, compile=False, checkpoint_every=100, preview_every=0,
    ),
    "lad": TrainConfig(
        steps=5000, batch_size=2, lr=3e-4, betas=(0.9, 0.999), lr_schedule="cosine", warmup_fraction=0.02,
        final_lr_fraction=0.05, checkpoint_every=500, preview_every=0,
    ),
}  # fmt: skip


def train_config(table: dict[str, TrainConfig], preset: str, steps: int | None, seed: int) -> TrainConfig:
    """The budget of ``preset`` (the ``lad`` one for ``lad-official``), with ``steps`` and ``seed`` set."""
    base = table.get(preset, table["lad"])
    return replace(base, steps=steps if steps is not None else base.steps, seed=seed)
