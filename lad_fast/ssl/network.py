"""The pretraining network, and the transfer of its weights into a fresh segmenter for fine-tuning.

:class:`SSLNet` is the segmenter's own U-Net (:class:`lad_fast.models.segmenter.Segmenter`, one output
channel: the reconstructed volume) plus a rotation head on the bottleneck. Fine-tuning starts from the
same shapes. ``transfer="all"`` (the default) moves every weight of the U-Net but the last 1x1
convolution (``head``, whose output channels are the organs there, the volume here), encoder and decoder
alike, as Models Genesis does; ``transfer="encoder"`` moves the encoder only (stem, down blocks,
pooling), as Swin UNETR does, and leaves the decoder at its fresh weights, for when a decoder that
learned to inpaint is a worse start for segmentation than a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lad_fast.config import SegmenterConfig
from lad_fast.errors import CheckpointError, ConfigError
from lad_fast.models.segmenter import Segmenter
from lad_fast.ssl.objectives import ROTATIONS

BODY = "body."
# segmenter keys left at their fresh initial weights, per transfer mode
NOT_TRANSFERRED = {"all": ("head.",), "encoder": ("head.", "up.", "unpool.", "norm_out.")}


class SSLNet(nn.Module):
    """x (B, 1, D, H, W) -> (reconstruction (B, 1, D, H, W), rotation logits (B, 4)); with ``contrast`` >
    0 a projection head (bottleneck -> ``contrast`` features, SimCLR's two layers) as well, and
    ``forward(x, view)`` returns the embeddings of both views of each volume after those two."""

    def __init__(self, cfg: SegmenterConfig, impl: str = "auto", contrast: int = 0) -> None:
        super().__init__()
        self.body = Segmenter(cfg, num_classes=1, impl=impl)
        c = cfg.channels[-1]
        self.rotation = nn.Linear(c, ROTATIONS)
        self.contrast = (
            nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, contrast)) if contrast else None
        )

    def forward(self, x: torch.Tensor, view: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        h, skips = self.body.encode(x)
        pooled = h.float().mean(dim=(2, 3, 4))  # global average pool of the bottleneck
        out = (self.body.decode(h, skips), self.rotation(pooled))
        if view is None:
            return out
        if self.contrast is None:
            raise ConfigError("this SSLNet has no projection head (contrast=0): it takes no second view")
        other = self.body.encode(view)[0].float().mean(dim=(2, 3, 4))  # the encoder only
        return (*out, self.contrast(pooled), self.contrast(other))


@dataclass(frozen=True)
class Transfer:
    """Where every weight went: ``loaded`` segmenter keys took pretrained values, ``fresh`` kept their
    initial ones, ``unused`` pretrained keys (the SSL heads) have no place in the segmenter."""

    loaded: tuple[str, ...]
    fresh: tuple[str, ...]
    unused: tuple[str, ...]


def check_transfer(transfer: str) -> None:
    """ConfigError unless ``transfer`` names a transfer mode (a key of :data:`NOT_TRANSFERRED`)."""
    if transfer not in NOT_TRANSFERRED:
        raise ConfigError(f"--transfer must be one of {', '.join(NOT_TRANSFERRED)}, got {transfer!r}")


def transfer_weights(
    pretrained: dict[str, torch.Tensor], seg: Segmenter, source: str = "", transfer: str = "all"
) -> Transfer:
    """Copy an :class:`SSLNet` state dict into ``seg`` (in place) and account for every key; ``transfer``:
    ``"all"`` or ``"encoder"`` (see the module docstring; ConfigError for another).

    Raises CheckpointError when a U-Net key is missing or has another shape (the pretrained run had
    another segmenter architecture) or when the state holds keys that are neither U-Net nor SSL head.
    """
    check_transfer(transfer)
    target = seg.state_dict()
    heads = ("rotation.", "contrast.")
    unknown = sorted(k for k in pretrained if not k.startswith(BODY) and not k.startswith(heads))
    if unknown:
        raise CheckpointError(f"{source}: not an SSL pretraining checkpoint (keys {unknown[:3]})")
    body = {k[len(BODY) :]: v for k, v in pretrained.items() if k.startswith(BODY)}
    loaded, fresh = [], []
    for key, value in target.items():
        if key.startswith(NOT_TRANSFERRED[transfer]):
            fresh.append(key)
            continue
        theirs = body.get(key)
        if theirs is None or tuple(theirs.shape) != tuple(value.shape):
            got = "missing" if theirs is None else f"shape {tuple(theirs.shape)}"
            raise CheckpointError(
                f"{source}: pretrained with another segmenter architecture ({key}: {got}, this network "
                f"needs {tuple(value.shape)}); pretrain with the same --preset as the fine-tuning"
            )
        loaded.append(key)
    with torch.no_grad():
        for key in loaded:
            target[key].copy_(body[key])
    used = {BODY + k for k in loaded}
    unused = tuple(sorted(k for k in pretrained if k not in used))
    return Transfer(tuple(loaded), tuple(fresh), unused)
