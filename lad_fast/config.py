"""Configuration: frozen dataclasses, and presets that are named data.

A component takes its own config (``VQGANConfig``, ``UNetConfig`` ...), never the whole tree. Every run
writes its resolved :class:`LadConfig` as ``config.json``; :func:`config_from_dict` reads it back.
Numbers for the ``lad`` and ``lad-official`` presets come from Lad's paper and code (docs/lad.md).

Why one long file: every config dataclass and the named presets live together so that a
preset reads beside the fields it sets; most of the length is the documented arithmetic of the
``lad-official`` sizes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from lad_fast.errors import ConfigError


@dataclass(frozen=True)
class GeometryConfig:
    """Voxel grid of prepared volumes, ``(D, H, W)`` with D the inferior-superior axis."""

    shape: tuple[int, int, int] = (32, 256, 256)
    spacing: tuple[float, float, float] = (2.3, 1.6, 1.6)  # mm along (D, H, W)
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # clipped, then mapped to [-1, 1]
    # A volume is "too small" when it covers less than this fraction of the field of view on an axis.
    min_coverage: float = 0.5
    # The slice window holds the most slices of these organs (Lad: pancreas and its lesions).
    window_organs: tuple[str, ...] = ("pancreas", "pancreatic_lesion")


@dataclass(frozen=True)
class PhantomConfig:
    """Procedural abdomen phantoms, written at ``spacing`` over ``shape`` (then prepared like real CT)."""

    shape: tuple[int, int, int] = (48, 256, 256)  # (D, H, W) of the written NIfTI
    spacing: tuple[float, float, float] = (2.3, 1.6, 1.6)
    noise_hu: float = 12.0
    blur_mm: float = 1.2


@dataclass(frozen=True)
class VQGANConfig:
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64)  # one entry per resolution; len - 1 stride-2 downsamplings
    res_blocks: int = 1
    groups: int = 8  # GroupNorm groups
    latent_channels: int = 8
    codebook_size: int = 16384
    code_dim: int = 8
    ema_decay: float = 0.99
    commitment: float = 0.25
    dead_code_threshold: float = 1.0  # EMA usage below this restarts the code from the batch
    # Layout options. The defaults are lad-fast's layout; the `lad-official` preset sets those of the
    # official Lad / Medical Diffusion (TATS) VQ-GAN (see _lad_official for how its sizes arise).
    encoder_res_blocks: tuple[int, ...] = ()  # per level, finest first; () = res_blocks at every level
    decoder_channels: tuple[int, ...] = ()  # per level, finest first; () = channels
    decoder_res_blocks: tuple[int, ...] = ()  # per level, finest first; () = res_blocks at every level
    # "conv3": pre-activated stride-2 3x3x3 conv down, nearest x2 + pre-activated 3x3x3 conv up;
    # "conv4": plain stride-2 4x4x4 conv down, plain stride-2 4x4x4 transposed conv up (official)
    resample: str = "conv3"
    decoder_in_kernel: int = 3  # the decoder's first conv (official: 1, its post-quantisation conv)
    # "out": GroupNorm + SiLU before the decoder's last conv; "in": right after its first conv (official)
    decoder_norm: str = "out"


@dataclass(frozen=True)
class VQGANLossConfig:
    l1: float = 4.0
    # Lad uses LPIPS x4, whose ImageNet weights cannot be downloaded here: the term is off until a
    # feature network is supplied (perceptual_weights: a lad-fast segmenter run, or a weights file).
    perceptual: float = 0.0
    perceptual_weights: str | None = None
    gan_2d: float = 0.25
    gan_3d: float = 0.25
    feature_matching: float = 4.0
    gan_start_step: int = 50_000
    # "a+b" is one box over the union (Lad: one box over pancreas and tumour, weight 1.0)
    locality_organs: tuple[str, ...] = ("pancreas+pancreatic_lesion",)
    locality_weights: tuple[float, ...] = (1.0,)
    locality_mode: str = "box"  # "box" (Lad) or "mask"
    disc_channels: int = 64


@dataclass(frozen=True)
class UNetConfig:
    channels: int = 64
    multipliers: tuple[int, ...] = (1, 2, 4, 8)
    res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2, 3)  # full 3D attention at these (coarse) levels
    heads: int = 8
    head_dim: int = 32
    groups: int = 8
    time_dim: int = 256
    dropout: float = 0.0
    # "lad_fast": LatentUNet (pre-activated 3x3x3 res blocks, full 3D attention at attention_levels, a
    # trained condition MLP). "official": OfficialLatentUNet, the official Lad / Medical Diffusion U-Net
    # (in-plane convs, spatial linear + depth attention, the raw 704-value condition); build either
    # with lad_fast.models.unet.build_unet.
    arch: str = "lad_fast"


SPATIAL_MODES = ("none", "concat", "concat_fine")


@dataclass(frozen=True)
class ConditionConfig:
    # Structure condition: per-slice Betti numbers of these canonical organs (Lad: bg, pancreas, lesion).
    structure_organs: tuple[str, ...] = ("background", "pancreas", "pancreatic_lesion")
    betti_3d: bool = False  # append per-organ 3D (b0, b1, b2)
    content_dim: int = 512  # content head output (Lad: 1x2x16x16 = 512)
    embed_dim: int = 256
    drop_prob: float = 0.25  # classifier-free guidance: replaced by a learned null condition
    # Spatial mask conditioning, beside the global content + structure vector above.
    # "none": Lad's global conditions only (the official method). "concat": the conditioning mask, one-hot
    # over the canonical organs and average-pooled to the latent grid
    # (lad_fast.conditioning.conditions.spatial_condition),
    # is concatenated to the U-Net input at every step; classifier-free guidance drops it together with the
    # global condition (same ``keep``), its null being zeros (lad_fast.conditioning.conditions.drop_spatial
    # says why).
    # "concat_fine": the same fractions on a twice finer grid, each latent voxel carrying its 8 octants'
    # (NUM_CLASSES x 8 channels), so the U-Net sees where inside a latent voxel an organ boundary lies.
    spatial: str = "none"
    # False: the content head keeps its random initialisation (requires_grad off, so no optimiser, EMA
    # change or weight decay touches it). The official code builds its content projection afresh and
    # untrained on every call; a frozen random projection, fixed by the run's seed and saved with the
    # weights, is the reproducible form of that (lad-official and bench/paper_table.py's Lad row).
    train_content: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.train_content, bool):
            raise ConfigError(f"condition.train_content must be true or false, got {self.train_content!r}")
        if self.spatial not in SPATIAL_MODES:
            raise ConfigError(
                f"condition.spatial must be one of {', '.join(SPATIAL_MODES)}, got {self.spatial!r}"
            )


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 300
    schedule: str = "cosine"  # "cosine" | "linear"
    prediction: str = "eps"  # "eps" | "x0" | "v"
    loss: str = "l1"  # "l1" | "l2"
    # Lad maps latents to [-1, 1] by the codebook's min/max, which leaves them with a small variance
    # (std ~0.2): few-step samplers then drift. "channel" also standardises each latent channel
    # (mean/std of the training latents, kept in the checkpoint) as latent diffusion models do;
    # "none" is Lad's plain scaling.
    latent_norm: str = "channel"
    # "ddpm": the discrete process above (Lad). "flow": flow matching / rectified flow (Lipman et al. 2023,
    # Liu et al. 2023, as in SD3 and MAISI-v2): x_t = (1 - t) x0 + t noise for t in [0, 1] (t = 0 data,
    # t = 1 noise), and the network predicts the velocity v = dx_t/dt = noise - x0 (``prediction`` is then
    # unused); it sees t * (timesteps - 1), the scale of the DDPM integer timesteps
    # (lad_fast/diffusion/schedules.py).
    objective: str = "ddpm"
    # DDPM only. "min_snr": Min-SNR-gamma weighting (Hang et al. 2023), weight min(SNR, gamma) in x0 terms.
    loss_weighting: str = "none"  # "none" | "min_snr"
    min_snr_gamma: float = 5.0
    # Flow only: the training distribution of t, before the shift.
    flow_t_sampling: str = "logit_normal"  # "logit_normal" (SD3: sigmoid of N(mean, std)) | "uniform"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    # Flow only: timestep shift t' = s t / (1 + (s - 1) t), in training and in the samplers' time grid.
    # s = flow_shift * sqrt(latent voxels / flow_shift_reference), or flow_shift when the reference is 0.
    flow_shift: float = 1.0
    flow_shift_reference: int = 0


@dataclass(frozen=True)
class SegmenterConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    groups: int = 8


# Volumes per sampler call: lad-fast generate's default --batch (and the plan's sampling batch).
GENERATE_BATCH = 4


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 2
    lr: float = 1.9e-5
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "constant" | "cosine" (to final_lr_fraction * lr at `steps`)
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of `steps`
    final_lr_fraction: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA weights
    amp: str = "none"  # "none" | "bf16" | "fp16"
    compile: bool = True  # only on CUDA
    log_every: int = 10
    checkpoint_every: int = 500
    preview_every: int = 1000
    max_bad_steps: int = 20  # non-finite steps tolerated before stopping
    num_workers: int = 0
    seed: int = 0

    def overridden(self, steps: int | None = None, batch: int | None = None) -> TrainConfig:
        """This config with the command line's ``--steps`` / ``--batch`` where given."""
        changes = {k: v for k, v in (("steps", steps), ("batch_size", batch)) if v is not None}
        return replace(self, **changes) if changes else self


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 8.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate_mm: float = 8.0
    elastic_mm: float = 6.0
    elastic_grid: int = 5
    morph_prob: float = 0.3  # per organ: dilate or erode by one voxel
    remove_prob: float = 0.0  # per organ (not background): drop it
    volume_range: tuple[float, float] = (0.7, 1.4)  # allowed organ volume ratio against the source


@dataclass(frozen=True)
class SamplingConfig:
    """What ``lad-fast generate`` does with a run when its options are not given (they override these).

    The defaults are the sampler, steps and guidance ``generate`` used before runs recorded them, so a
    run written then generates as it did; presets set the measured best for their model.
    """

    sampler: str = "ddpm"  # ddpm | ddim | dpmpp2m (DDPM objective) | euler | heun (flow objective)
    steps: int = 50  # ignored by ddpm, which walks all T steps
    guidance: float = 2.0  # classifier-free guidance scale: 0 unconditional, 1 conditional


@dataclass(frozen=True)
class LadConfig:
    """The whole tree. Components take their own part of it."""

    preset: str = "lad"
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    vqgan_loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    vqgan_train: TrainConfig = field(default_factory=TrainConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    diffusion_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-4, betas=(0.9, 0.999), batch_size=5, ema_decay=0.995)
    )
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    segmenter_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-3, betas=(0.9, 0.999), steps=5000, batch_size=2)
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.unet.arch == "official" and self.condition.spatial != "none":
            raise ConfigError(
                f"condition.spatial={self.condition.spatial!r} needs unet.arch='lad_fast': the official "
                "U-Net has no spatial input; use spatial='none' or the lad / tiny preset"
            )


# Generation that follows its masks in few steps (measured with bench/quality.py at tiny, docs/results.md):
# flow matching (rectified flow) instead of Lad's DDPM, the conditioning mask concatenated to the U-Net
# input besides Lad's global content + structure conditions, and a 30-step Euler sampler with guidance 3.
# The field defaults stay Lad's (DDPM, global conditions), which is what runs written before these
# fields existed were trained with; lad-official keeps Lad's settings.
FLOW = DiffusionConfig(objective="flow")
SPATIAL = ConditionConfig(spatial="concat_fine")
FEW_STEPS = SamplingConfig(sampler="euler", steps=30, guidance=3.0)


def _lad() -> LadConfig:
    return LadConfig(diffusion=FLOW, condition=SPATIAL, sampling=FEW_STEPS)


TINY_LOCALITY_ORGANS = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "pancreas+pancreatic_lesion",
    "stomach",
    "gallbladder",
    "aorta",
    "inferior_vena_cava",
    "vertebrae",
)


def _tiny() -> LadConfig:
    """CPU-sized: same field of view as ``lad`` at 4x coarser in-plane and 2x coarser axial spacing."""
    return LadConfig(
        preset="tiny",
        geometry=GeometryConfig(shape=(16, 64, 64), spacing=(4.6, 6.4, 6.4)),
        phantom=PhantomConfig(shape=(24, 64, 64), spacing=(4.6, 6.4, 6.4), noise_hu=10.0, blur_mm=3.0),
        # No res blocks: on 2 CPU cores the full-resolution 3x3x3 convs dominate a step (measured), so the
        # capacity sits in the stride-2 convs. GAN and perceptual terms are off at tiny (L1 + locality).
        vqgan=VQGANConfig(channels=(16, 32, 64), res_blocks=0, groups=8, codebook_size=512, code_dim=8),
        # The locality loss on every organ's mask (Lad: the pancreas box only) and 1800 steps: the built-in
        # segmenter finds the organs of reconstructed held-out phantoms with mean Dice 0.65 after Lad's
        # 900 steps with the pancreas box, 0.70 with every organ's mask, 0.71 after 1800 steps (measured
        # one change at a time; that Dice bounds what any generated volume can reach, docs/results.md).
        vqgan_loss=VQGANLossConfig(
            perceptual=0.0,
            gan_2d=0.0,
            gan_3d=0.0,
            gan_start_step=10**9,
            disc_channels=16,
            locality_organs=TINY_LOCALITY_ORGANS,
            locality_weights=(1.0,) * len(TINY_LOCALITY_ORGANS),
            locality_mode="mask",
        ),
        # 1800 cosine-decayed steps reach held-out L1 ~0.03 on phantoms in about 5 minutes on two cores
        vqgan_train=TrainConfig(
            steps=1800,
            batch_size=2,
            lr=3e-3,
            lr_schedule="cosine",
            betas=(0.9, 0.99),
            compile=False,
            log_every=10,
            checkpoint_every=300,
            preview_every=300,
        ),
        # Diffusion: a batch-8 step of this 3.1M-parameter U-Net takes about 0.3 s on one CPU thread, so
        # 800 steps train in about 4-5 minutes on two cores (measured with other jobs running).
        unet=UNetConfig(
            channels=24, multipliers=(1, 2, 4), attention_levels=(1, 2), heads=4, head_dim=16, time_dim=96
        ),
        condition=replace(SPATIAL, content_dim=64, embed_dim=96),
        diffusion=FLOW,
        sampling=FEW_STEPS,
        diffusion_train=TrainConfig(
            steps=800,
            batch_size=8,
            lr=8e-4,
            betas=(0.9, 0.999),
            ema_decay=0.99,
            compile=False,
            log_every=10,
            checkpoint_every=200,
            preview_every=500,
        ),
        # Four levels: the coarsest sees the whole 64x64 slab (organ side and position) at little cost.
        segmenter=SegmenterConfig(channels=(16, 32, 64, 128)),
        segmenter_train=TrainConfig(
            steps=640,
            batch_size=4,
            lr=3e-3,
            lr_schedule="cosine",
            warmup_fraction=0.05,
            final_lr_fraction=0.02,
            betas=(0.9, 0.999),
            compile=False,
            checkpoint_every=160,
        ),
    )


def _lad_official() -> LadConfig:
    """``lad``'s geometry with the official Lad architecture at its exact sizes, and Lad's diffusion settings.

    ``lad`` runs lad-fast's own (smaller VQ-GAN, larger U-Net) models on the official geometry; this
    preset is the one to compare speed against the official code with, so that a speed-up is never a
    smaller network. Sizes were read from Medical Diffusion's ``vq_gan_3d/model/vqgan.py`` and
    ``ddpm/diffusion.py`` (Lad's code is a fork of it) and checked by instantiating those modules:

    VQ-GAN (TATS layout, n_hiddens 16, downsample 4 per axis, 8-dim codes): **1,391,081** parameters.
      encoder 441,568: 3x3x3 conv 1->16 (448); per level a 4x4x4 stride-2 conv then one res block:
      16->32 (32,800) + res 32 (55,488), 32->64 (131,136) + res 64 (221,568); GroupNorm 64 (128).
      pre-quantisation 1x1x1 conv 64->8 (520), lad-fast's ``Encoder.conv_out``.
      post-quantisation 1x1x1 conv 8->64 (576), lad-fast's ``Decoder.conv_in`` (decoder_in_kernel=1).
      decoder 948,417: GroupNorm 64 (128); per level a 4x4x4 stride-2 transposed conv then two res
      blocks: 64->64 (262,208) + 2 x res 64 (443,136), 64->32 (131,104) + 2 x res 32 (110,976); 3x3x3
      conv 32->1 (865). The decoder's widths are 64, 64, 32 (never 16), hence decoder_channels.
      A res block at c channels: 2 GroupNorms (4c) + 2 convs 3x3x3 (2 (27c^2 + c)). The EMA codebook is
      buffers, not parameters, in both codes.
    U-Net (Unet3D: dim 64, dim_mults (1, 2, 4, 8), 8 latent channels, 8 heads x 32, cond_dim 704):
      **41,317,960** trainable parameters (41,317,976 ``nn.Parameter`` values: rotary-embedding-torch
      keeps its 16 rotary frequencies as a frozen parameter; lad-fast computes them on the fly).
      stem (1,7,7) conv 8->64 (25,152) + depth attention 64 (65,600); time MLP 64->256->256 (82,432);
      null condition (704); relative-position bias 32 x 8 (256); down levels 18,205,824; middle
      12,461,056; up levels 10,357,184; last res block 128->64 (119,232) + 1x1x1 conv 64->8 (520).
      Res block in->out with FiLM from 256 + 704 = 960 values: 960*2out + 2out (FiLM) + 9 in out + out
      + 9 out^2 + out + 4 out (convs, GroupNorms) + (in out + out when in != out). Spatial linear
      attention at c: 1026c (LayerNorm c, q/k/v 768c, output 256c + c); depth or slice
      attention at c: 1025c (LayerNorm c, q/k/v 768c, output 256c, no biases). In-plane (1,4,4)
      resampling at c: 16c^2 + c.
      lad-fast adds the content head (two stride-2 3x3x3 convs 8->4->1: 977 parameters), which the
      official code builds afresh, untrained, on every call; here it is built once and frozen at its
      random initialisation (``condition.train_content=False``), so the trainable count is the official
      one, with 41,318,937 parameter values in all.
    """
    base = _lad()
    return replace(
        base,
        preset="lad-official",
        vqgan=replace(
            base.vqgan,
            channels=(16, 32, 64),
            encoder_res_blocks=(0, 1, 1),
            decoder_channels=(32, 64, 64),
            decoder_res_blocks=(2, 2, 0),
            resample="conv4",
            decoder_in_kernel=1,
            decoder_norm="in",
        ),
        unet=UNetConfig(
            channels=64,
            multipliers=(1, 2, 4, 8),
            res_blocks=2,
            attention_levels=(0, 1, 2, 3),
            heads=8,
            head_dim=32,
            groups=8,
            time_dim=256,
            arch="official",
        ),
        # The official U-Net conditions on the raw vector: content 512 + structure 192 = 704.
        # Its content projection stays untrained (random), as in the official code.
        condition=replace(
            base.condition, content_dim=512, embed_dim=704, spatial="none", train_content=False
        ),
        # Lad's diffusion: T = 300, cosine, epsilon, L1, latents scaled by the codebook's min/max.
        diffusion=replace(
            base.diffusion,
            timesteps=300,
            schedule="cosine",
            prediction="eps",
            loss="l1",
            latent_norm="none",
            objective="ddpm",
            loss_weighting="none",
        ),
        # Lad's sampling: ancestral DDPM over all 300 steps, called with guidance scale 1.
        sampling=SamplingConfig(sampler="ddpm", steps=300, guidance=1.0),
    )


PRESETS: dict[str, typing.Callable[[], LadConfig]] = {
    "tiny": _tiny,
    "lad": _lad,
    "lad-official": _lad_official,
}


def get_preset(name: str) -> LadConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _coerce(tp: Any, value: Any, where: str = "") -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        many = len(args) == 2 and args[1] is Ellipsis
        # a hand-edited config: a bare number or a tuple of the wrong length is named, not a zip() traceback
        if not isinstance(value, (list, tuple)) or (not many and len(value) != len(args)):
            want = "a list" if many else f"a list of {len(args)} values"
            raise ConfigError(f"{where}: expected {want}, got {value!r}")
        if many:
            return tuple(_coerce(args[0], v, where) for v in value)
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    return value


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping of its fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: _coerce(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()})


# The section names of a LadConfig ("geometry", "vqgan", "unet" ...).
LAD_SECTIONS: frozenset[str] = frozenset(f.name for f in fields(LadConfig) if f.name != "preset")


def with_defaults(data: Mapping[str, Any], section: str | None = None) -> dict[str, Any]:
    """``data`` as JSON (lists for tuples) with the fields it lacks filled by their defaults.

    ``data`` holds :class:`LadConfig` sections by name (other keys pass through unchanged), or is the
    dict of the one ``section`` named. Used to compare a config recorded by an older lad-fast, which
    lacks fields added since (they take their defaults when it is loaded), with a current one.
    """
    wrapped = {section: dict(data)} if section is not None else dict(data)
    sections = {k: v for k, v in wrapped.items() if k in LAD_SECTIONS and isinstance(v, dict)}
    filled = config_to_dict(config_from_dict(sections))
    out = json.loads(json.dumps({**wrapped, **{k: filled[k] for k in sections}}))
    return out[section] if section is not None else out


def config_from_dict(data: dict[str, Any]) -> LadConfig:
    """Inverse of :func:`config_to_dict`; fields missing from ``data`` take their defaults."""
    return _from_dict(LadConfig, data)
