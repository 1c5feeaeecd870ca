"""Distribution and similarity metrics for generated volumes: FID, MMD, MS-SSIM and diversity.

Each function states its definition and where it comes from; the tests compare ``fid``,
``mmd(kernel="linear")`` and ``ms_ssim`` against MONAI (``FIDMetric``, ``MMDMetric``,
``MultiScaleSSIMMetric``), which is a test dependency only.

Feature inputs are (N, F) arrays (numpy or torch) of one feature extractor's outputs
(:mod:`lad_fast.evaluate.features`); they are compared in float64. Volumes are (B, C, D, H, W) tensors
in [-1, 1] (``data_range`` 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError, InputError

# MONAI MultiScaleSSIMMetric's defaults (Wang, Simoncelli and Bovik 2003, Table 1 exponents)
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_SIGMA = 1.5
MS_SSIM_K1, MS_SSIM_K2 = 0.01, 0.03
MAX_KERNEL, MIN_KERNEL = 11, 3

# Multipliers of the median pairwise squared distance: the bandwidths of the Gaussian MMD.
GAUSSIAN_MMD_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def _features(x: np.ndarray | torch.Tensor, side: str) -> np.ndarray:
    """(N, F) float64 numpy copy of ``x``; refuses other ranks and non-finite values."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    if a.ndim != 2:
        raise InputError(f"{side} features must be (N, F), got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise InputError(
            f"NaN features: the {side} features hold {int((~np.isfinite(a)).sum())} NaN or infinite "
            "values; check the volumes and the feature extractor's weights"
        )
    return a


def _pair(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(real, "real"), _features(fake, "synthetic")
    if x.shape[1] != y.shape[1]:
        raise InputError(
            f"{metric}: real and synthetic features differ in width ({x.shape[1]} vs {y.shape[1]})"
        )
    for side, a in (("real", x), ("synthetic", y)):
        if a.shape[0] < 2:
            raise InputError(
                f"{metric} is undefined for fewer than 2 samples on a side ({side} has {a.shape[0]}); "
                "evaluate at least 2 real and 2 synthetic volumes"
            )
    return x, y


# ----------------------------------------------------------------------------------------------- FID


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrtm(s1 @ s2) for symmetric PSD s1, s2.

    s1 s2 is similar to s1^1/2 s2 s1^1/2 (symmetric PSD), so the trace of its principal square root is
    the sum of the square roots of that matrix's eigenvalues. Two symmetric eigendecompositions are
    stable where ``scipy.linalg.sqrtm`` of the non-symmetric product is not (N < F makes it singular);
    round-off negatives are clipped to 0.
    """
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r @ s2 @ r
    e = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(e, 0.0, None)).sum())


def fid(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to real (N, F) and synthetic (M, F) features.

    d^2 = |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr sqrtm(S_r S_f)  (Heusel et al. 2017), in float64,
    with MONAI ``FIDMetric``'s estimator: sample covariances with 1/(N-1). The trace of the matrix square
    root comes from an eigendecomposition (see ``_trace_sqrt_product``), which agrees with MONAI's
    ``scipy.linalg.sqrtm`` within 1e-6 relative (tests, N < F included); as in MONAI, ``eps`` is added to
    both diagonals if that fails (never seen with finite inputs).
    Raises InputError for fewer than 2 samples on a side (FID undefined) and for NaN features.
    """
    x, y = _pair(real, fake, "FID")
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False, ddof=1), np.cov(y, rowvar=False, ddof=1)
    s_x, s_y = np.atleast_2d(s_x), np.atleast_2d(s_y)
    try:
        tr = _trace_sqrt_product(s_x, s_y)
    except np.linalg.LinAlgError:
        tr = float("nan")
    if not math.isfinite(tr):
        off = np.eye(len(s_x)) * eps
        tr = _trace_sqrt_product(s_x + off, s_y + off)
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(s_x) + np.trace(s_y) - 2.0 * tr)


# ----------------------------------------------------------------------------------------------- MMD


def _unbiased_mmd2(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3): within-sample means exclude the diagonal."""
    n, m = len(k_xx), len(k_yy)
    a = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    b = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(a + b - 2.0 * k_xy.sum() / (n * m))


def mmd(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, kernel: str = "linear") -> float:
    """Unbiased squared maximum mean discrepancy between real (N, F) and synthetic (M, F) features.

    ``kernel="linear"``: k(x, y) = x . y, MONAI ``MMDMetric`` with its default ``y_mapping=None`` (no
    mapping), i.e. sum_{i!=j} x_i.x_j / (N(N-1)) + sum_{i!=j} y_i.y_j / (M(M-1)) - 2 sum x_i.y_j / (NM).
    It estimates |mu_r - mu_f|^2 and can be slightly negative. (MONAI requires N == M; here N != M is
    allowed with the same formula.)

    ``kernel="gaussian"``: the multi-bandwidth Gaussian kernel of torch-two-sample's ``MMDStatistic``
    that HA-GAN's evaluation (and 3D MedDiffusion after it) reports:
    k(x, y) = sum_j exp(-|x - y|^2 / (c_j * med)), c_j in ``GAUSSIAN_MMD_FACTORS`` = (0.25, 0.5, 1, 2, 4),
    with ``med`` the median squared distance over all pairs of the pooled real + synthetic sample
    (median heuristic; it makes the value invariant to the feature scale). Same unbiased estimator.
    It is 0 in expectation when both samples come from one distribution, and at most 2 * 5.

    Raises InputError for fewer than 2 samples on a side, different widths, NaN features or an unknown
    kernel.
    """
    if kernel not in ("linear", "gaussian"):
        raise ConfigError(f"mmd: kernel must be 'linear' or 'gaussian', got {kernel!r}")
    x, y = _pair(real, fake, "MMD")
    if kernel == "linear":
        return _unbiased_mmd2(x @ x.T, y @ y.T, x @ y.T)
    z = np.concatenate([x, y])
    sq = (z * z).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0, None)  # (N+M, N+M)
    np.fill_diagonal(d2, 0.0)
    off = d2[np.triu_indices(len(z), k=1)]
    med = float(np.median(off))
    if med <= 0.0:  # more than half the pairs coincide: fall back to the mean distance
        med = float(off.mean())
        if med <= 0.0:
            return 0.0  # every point identical: the two samples are the same distribution
    k = sum(np.exp(-d2 / (c * med)) for c in GAUSSIAN_MMD_FACTORS)
    n = len(x)
    return _unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:])


# ------------------------------------------------------------------------------------------- MS-SSIM


def _ms_ssim_weights(scales: int) -> tuple[float, ...]:
    """MONAI's five weights as they are; the first ``scales`` renormalised to sum 1 when fewer."""
    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ConfigError(f"MS-SSIM scales must be 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
    if scales == len(MS_SSIM_WEIGHTS):
        return MS_SSIM_WEIGHTS
    w = MS_SSIM_WEIGHTS[:scales]
    return tuple(v / sum(w) for v in w)


def _fits(size: int, kernel: int, scales: int) -> bool:
    """Whether an axis of ``size`` takes ``kernel`` at every scale, and passes MONAI's own size check.

    The coarsest scale is floor(size / 2^(scales-1)) long and needs at least ``kernel`` voxels (valid
    convolution). MONAI's ``compute_ms_ssim`` additionally asks size // (scales-1)^2 > kernel - 1; we
    keep to settings that satisfy both so that MONAI stays usable as the test oracle.
    """
    return size // 2 ** (scales - 1) >= kernel and size // max(1, scales - 1) ** 2 > kernel - 1


def ms_ssim_settings(shape: Sequence[int]) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """Largest MS-SSIM setting for volumes of spatial ``shape`` (D, H, W): (kernel_size per axis, weights).

    MONAI's default (kernel 11, 5 scales) needs more than 160 voxels per side. Here the scale count comes
    first (as many of MONAI's 5 as the shortest axis allows with a kernel of at least 3), then each axis
    gets the largest odd kernel up to 11 that fits its coarsest scale; sigma stays 1.5. Weights are
    MONAI's, renormalised over the scales used. What this gives:

    - ``tiny`` (16, 64, 64): kernel (3, 11, 11), 3 scales, weights (0.0711, 0.4530, 0.4760);
    - ``lad`` (32, 256, 256): kernel (3, 11, 11), 4 scales, weights (0.0517, 0.3295, 0.3462, 0.2726);
    - 176 voxels or more per side: MONAI's default, kernel 11 and 5 scales.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ConfigError(f"ms_ssim_settings: expected a spatial shape (D, H, W), got {shape}")
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        kernels = []
        for s in shape:
            fit = [k for k in range(MAX_KERNEL, MIN_KERNEL - 1, -2) if _fits(s, k, scales)]
            if not fit:
                break
            kernels.append(fit[0])
        else:
            return (kernels[0], kernels[1], kernels[2]), _ms_ssim_weights(scales)
    raise ConfigError(f"MS-SSIM needs at least {MIN_KERNEL} voxels per side, got {shape}")


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _blur(x: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
    """Separable valid Gaussian filter of (B, C, D, H, W), one 1D pass per axis (the 3D kernel is their
    outer product, as MONAI builds it)."""
    c = x.shape[1]
    for axis, g in enumerate(windows):
        shape = [1, 1, 1]
        shape[axis] = len(g)
        x = F.conv3d(x, g.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return x


def ms_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    kernel_size: int | Sequence[int] | None = None,
    scales: int | None = None,
    weights: Sequence[float] | None = None,
    data_range: float = 2.0,
) -> torch.Tensor:
    """Multi-scale SSIM (Wang, Simoncelli and Bovik 2003) of each pair of 3D volumes: (B,) in [0, 1].

    a, b: (B, C, D, H, W), same shape. MONAI ``MultiScaleSSIMMetric(spatial_dims=3)``'s definition:
    Gaussian window (sigma 1.5, valid convolution), k1 = 0.01, k2 = 0.03, at each scale the mean
    contrast-structure term cs, at the coarsest the mean SSIM, each clipped at 0 and raised to its
    weight, the product over scales; 2x average pooling between scales. Computed in float32 (float64
    inputs stay float64), with a separable filter.

    Settings: ``kernel_size`` (int or per axis) and ``weights``; ``scales`` = the first that many of
    MONAI's weights, renormalised. Omitted ones come from :func:`ms_ssim_settings` (kernel) or are the
    most scales the kernel fits. Raises ConfigError when the volumes are too small for the settings.
    """
    if a.shape != b.shape or a.ndim != 5:
        raise InputError(
            f"ms_ssim: expected two (B, C, D, H, W) volumes of one shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    spatial = tuple(a.shape[2:])
    if kernel_size is None:
        kernel_size, auto_weights = ms_ssim_settings(spatial)
        if weights is None and scales is None:
            weights = auto_weights
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if len(ks) != 3 or any(k < 1 or k % 2 == 0 for k in ks):
        raise ConfigError(f"ms_ssim: kernel_size must be odd and positive (one or three), got {kernel_size}")
    if weights is None:
        if scales is None:
            fitting = [
                n for n in range(1, 6) if all(_fits(s, k, n) for s, k in zip(spatial, ks, strict=True))
            ]
            scales = max(fitting, default=1)
        weights = _ms_ssim_weights(scales)
    elif scales is not None and scales != len(weights):
        raise ConfigError(f"ms_ssim: scales={scales} disagrees with {len(weights)} weights")
    n = len(weights)
    for s, k in zip(spatial, ks, strict=True):
        if s // 2 ** (n - 1) < k:
            raise ConfigError(
                f"ms_ssim: volumes {spatial} are too small for kernel {ks} at {n} scales (each side needs "
                f"at least kernel * 2^(scales-1) voxels); use ms_ssim_settings(shape) or fewer scales"
            )
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.to(dtype), b.to(dtype)
    windows = [_gaussian_1d(k, MS_SSIM_SIGMA, dtype, x.device) for k in ks]
    c1, c2 = (MS_SSIM_K1 * data_range) ** 2, (MS_SSIM_K2 * data_range) ** 2
    bsz, ch = x.shape[:2]
    terms = []
    for i in range(n):
        # the five local moments of each channel in one filtering pass: (B, 5C, d, h, w)
        mom = _blur(torch.cat([x, y, x * x, y * y, x * y], 1), windows).view(bsz, 5, ch, -1)
        mu_x, mu_y, xx, yy, xy = mom.unbind(1)
        var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        if i < n - 1:
            terms.append(torch.relu(cs.flatten(1).mean(1)))
            x, y = F.avg_pool3d(x, 2), F.avg_pool3d(y, 2)
        else:
            ssim = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs
            terms.append(torch.relu(ssim.flatten(1).mean(1)))
    w = torch.tensor(weights, dtype=dtype, device=x.device)
    return torch.prod(torch.stack(terms) ** w[:, None], dim=0)


def diversity(
    volumes: torch.Tensor,
    *,
    kernel_size: int | Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    data_range: float = 2.0,
    max_pairs: int = 256,
    seed: int = 0,
    batch_size: int = 8,
) -> float:
    """Diversity score: mean pairwise MS-SSIM among synthetic volumes (N, 1, D, H, W) in [-1, 1].

    LOWER means MORE diverse (1 = all volumes identical). All N(N-1)/2 pairs are used when they are at
    most ``max_pairs``; otherwise ``max_pairs`` distinct pairs drawn with ``seed`` (numpy default_rng), so
    the score is reproducible. MS-SSIM settings default to :func:`ms_ssim_settings` of the volume shape.
    """
    if not isinstance(volumes, torch.Tensor) or volumes.ndim != 5:
        raise InputError(
            f"diversity: expected volumes (N, C, D, H, W), got {getattr(volumes, 'shape', None)}"
        )
    n = volumes.shape[0]
    if n < 2:
        raise InputError(f"diversity is undefined for fewer than 2 volumes, got {n}")
    if kernel_size is None and weights is None:
        kernel_size, weights = ms_ssim_settings(volumes.shape[2:])
    total = n * (n - 1) // 2
    if total <= max_pairs:
        pairs = list(combinations(range(n), 2))
    else:
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(total, size=max_pairs, replace=False))
        pairs = [_unrank_pair(int(r), n) for r in flat]
    scores = []
    for s in range(0, len(pairs), batch_size):
        i, j = zip(*pairs[s : s + batch_size], strict=True)
        scores.append(
            ms_ssim(
                volumes[list(i)],
                volumes[list(j)],
                kernel_size=kernel_size,
                weights=weights,
                data_range=data_range,
            )
        )
    return float(torch.cat(scores).double().mean())


def _unrank_pair(r: int, n: int) -> tuple[int, int]:
    """The r-th pair (i < j) of range(n) in lexicographic order (r in [0, n(n-1)/2))."""
    i = 0
    while r >= n - 1 - i:
        r -= n - 1 - i
        i += 1
    return i, i + 1 + r
