"""Feature extractors for FID and MMD: volumes (B, 1, D, H, W) in [-1, 1] -> features (B, F) float32.

Selected by name with :func:`make_extractor`:

- ``"medicalnet"``: a MedicalNet (Med3D) 3D ResNet-10/18/34/50 (:mod:`lad_fast.evaluate.nets.medicalnet`) with
  weights from a local file the user passes; each volume is normalised to zero mean and unit standard
  deviation over all its voxels before the network (MedicalNet's training normalisation; its MRI
  recipe used the non-zero voxels only and filled the background with noise, which has no meaning for
  a CT window and would make features random), then global average pooling: F = 512 (depths 10-34) or
  2048 (depth 50). ``weights_hash`` is the SHA-256 of the weights file (first 16 hex digits).
- ``"segmenter"``: the encoder of a trained lad-fast :class:`~lad_fast.models.segmenter.Segmenter` (works
  offline). Every encoder scale is global-average-pooled and the poolings are concatenated, so the
  features see both fine texture and coarse layout: F = sum of the segmenter's channels (112 for the
  default (16, 32, 64)). ``weights_hash`` is a SHA-256 over the state dict (names, dtypes, shapes,
  values; first 16 hex digits).
- ``"vqgan"``: the encoder of the VQ-GAN of the run that generated the volumes (works offline, needs no
  segmenter, so an evaluation right after ``lad-fast train`` on labelled data has features). The output of
  every encoder block and the continuous latents are global-average-pooled, plus the latents' per-channel
  standard deviation, and concatenated. It is the generator's own encoder, trained on the same real
  volumes: it sees what the generator models, so read its FID against the real-vs-real floor and the
  trivial generator of the same report, not against another extractor's numbers.
- ``"radimagenet-2.5d"``: MAISI's 2.5D protocol (NV-Generate-CTMR ``scripts/compute_fid_2-5d_ct.py``)
  with a RadImageNet 2D ResNet-50 (:mod:`lad_fast.evaluate.nets.radimagenet`, weights from a local file):
  every
  axial, coronal and sagittal slice, the volume min-max scaled to [0, 1], repeated to 3 channels minus
  (0.406, 0.456, 0.485), globally pooled; F = 2048. MAISI reports one FID per plane with slices as
  samples; here each volume gets ONE vector (mean over the slices of a plane, then over the three
  planes) so the per-volume FID/MMD apply, and volumes arrive in the preset's HU window rather than
  MAISI's [-1000, 1000]: the numbers are not comparable with MAISI's tables.

Features of different extractors (or weights) are not comparable: reports name both ``name`` and
``weights_hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from lad_fast.errors import ConfigError, InputError

EXTRACTORS = ("segmenter", "vqgan", "medicalnet", "radimagenet-2.5d")


@runtime_checkable
class FeatureExtractor(Protocol):
    """``extractor(volumes (B, 1, D, H, W) in [-1, 1]) -> (B, F) float32`` on the CPU, without grad."""

    name: str
    weights_hash: str

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor: ...


class BatchedExtractor:
    """A feature function run in batches on ``device``; inputs and outputs stay on the caller's side.

    ``features`` maps a batch (b, 1, D, H, W) float32 on ``device`` to (b, F).
    """

    def __init__(
        self,
        name: str,
        weights_hash: str,
        features: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str = "cpu",
        batch_size: int = 4,
    ):
        if batch_size < 1:
            raise ConfigError(f"feature extractor batch_size must be >= 1, got {batch_size}")
        self.name, self.weights_hash = name, weights_hash
        self._features, self.device, self.batch_size = features, torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        if volumes.ndim != 5 or volumes.shape[1] != 1:
            raise InputError(
                f"{self.name} features: expected volumes (B, 1, D, H, W), got {tuple(volumes.shape)}"
            )
        out = [
            self._features(volumes[s : s + self.batch_size].to(self.device, torch.float32)).float().cpu()
            for s in range(0, volumes.shape[0], self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weights_hash={self.weights_hash!r})"


def state_dict_hash(module: nn.Module) -> str:
    """First 16 hex digits of a SHA-256 over a module's state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    """First 16 hex digits of the SHA-256 of a file (compare with ``sha256sum``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-volume zero mean, unit std over all voxels (constant volumes become zeros)."""
    flat = x.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1, 1)
    std = flat.std(1, unbiased=False).view(-1, 1, 1, 1, 1)
    return (x - mean) / std.clamp_min(1e-6)


# subtracted from channels 0, 1, 2 (the Keras weights' BGR order), as MAISI's subtract_mean does
RADIMAGENET_MEAN = (0.406, 0.456, 0.485)


def _radimagenet_2p5d(net: nn.Module, slice_batch: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    def features(x: torch.Tensor) -> torch.Tensor:  # (b, 1, D, H, W) -> (b, 2048)
        mean = torch.tensor(RADIMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        out = []
        for vol in x[:, 0]:  # (D, H, W)
            lo, hi = vol.min(), vol.max()
            vol = (vol - lo) / (hi - lo + 1e-10)  # MAISI: min-max over all slices of the volume
            planes = []
            for stack in (vol, vol.permute(1, 0, 2), vol.permute(2, 0, 1)):  # axial, coronal, sagittal
                feats = [
                    net(stack[i : i + slice_batch, None].expand(-1, 3, -1, -1) - mean)
                    for i in range(0, stack.shape[0], slice_batch)
                ]
                planes.append(torch.cat(feats).mean(0))  # (2048,): mean over the plane's slices
            out.append(torch.stack(planes).mean(0))
        return torch.stack(out)

    return features


def _segmenter_features(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.mean(dim=(2, 3, 4)) for f in net.encoder_features(x)], dim=1)

    return features


def _vqgan_features(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def features(x: torch.Tensor) -> torch.Tensor:
        pooled: list[torch.Tensor] = []
        hooks = [
            block.register_forward_hook(lambda _m, _i, out: pooled.append(out.mean(dim=(2, 3, 4))))
            for block in net.encoder.blocks
        ]
        try:
            z = net.encode_pre_quant(x)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([*pooled, z.mean(dim=(2, 3, 4)), z.flatten(2).std(dim=2, unbiased=False)], dim=1)

    return features


def make_extractor(
    name: str,
    *,
    weights: str | Path | None = None,
    segmenter: nn.Module | None = None,
    vqgan: nn.Module | None = None,
    depth: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
) -> BatchedExtractor:
    """The feature extractor ``name`` (one of :data:`EXTRACTORS`), in eval mode.

    - "medicalnet" needs ``weights`` (a local MedicalNet ``.pth``); ``depth`` is inferred from it when
      omitted.
    - "segmenter" needs ``segmenter``, an already-loaded lad-fast Segmenter (it is put in eval mode and
      moved to ``device``, in place).
    - "vqgan" needs ``vqgan``, the generator run's loaded VQ-GAN (eval mode, moved to ``device``, in place).
    - "radimagenet-2.5d" needs ``weights`` (RadImageNet-ResNet50_notop.pth).
    Raises ConfigError for an unknown name or a missing argument, InputError for unusable weights.
    """
    if name == "medicalnet":
        from lad_fast.evaluate.nets.medicalnet import WEIGHTS_HELP, load_medicalnet

        if weights is None:
            raise ConfigError(f"the medicalnet feature extractor needs a weights file. {WEIGHTS_HELP}")
        net = load_medicalnet(weights, depth=depth).to(device)
        return BatchedExtractor(
            f"medicalnet-resnet{net.depth}",
            file_hash(Path(weights)),
            lambda x: net(_standardise(x)),
            device,
            batch_size,
        )
    if name == "segmenter":
        if segmenter is None or not hasattr(segmenter, "encoder_features"):
            raise ConfigError(
                "the segmenter feature extractor needs a trained lad-fast segmenter (pass a run that holds "
                "one with --segmenter)"
            )
        net = segmenter.to(device).eval()
        return BatchedExtractor(
            "segmenter", state_dict_hash(net), _segmenter_features(net), device, batch_size
        )
    if name == "vqgan":
        if vqgan is None or not hasattr(vqgan, "encode_pre_quant"):
            raise ConfigError(
                "the vqgan feature extractor needs the VQ-GAN of the run that generated the volumes (its "
                "manifest names the run; train one with `lad-fast train`)"
            )
        net = vqgan.to(device).eval()
        return BatchedExtractor("vqgan", state_dict_hash(net), _vqgan_features(net), device, batch_size)
    if name == "radimagenet-2.5d":
        from lad_fast.evaluate.nets.radimagenet import WEIGHTS_HELP, load_radimagenet

        if weights is None:
            raise ConfigError(f"the radimagenet-2.5d feature extractor needs a weights file. {WEIGHTS_HELP}")
        net = load_radimagenet(weights).to(device)
        return BatchedExtractor(name, file_hash(Path(weights)), _radimagenet_2p5d(net), device, batch_size)
    raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
