from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric

from lad_fast.errors import ConfigError, InputError
from lad_fast.evaluate.metrics import _unrank_pair, diversity, fid, mmd, ms_ssim, ms_ssim_settings


def features(n: int, m: int, f: int, seed: int = 0, shift: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(f, f)) / np.sqrt(f)  # correlated features, like a network's
    return rng.normal(size=(n, f)) @ mix, 1.3 * rng.normal(size=(m, f)) @ mix + shift


# ----------------------------------------------------------------------------------------------- FID


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside MONAI's FIDMetric
@pytest.mark.parametrize("n,m,f", [(40, 30, 8), (64, 64, 16), (6, 9, 32), (3, 3, 64), (12, 10, 256)])
def test_fid_agrees_with_monai(n, m, f):
    x, y = features(n, m, f)
    ref = FIDMetric()(torch.from_numpy(y), torch.from_numpy(x)).item()
    assert fid(x, y) == pytest.approx(ref, rel=1e-6)
    assert fid(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(ref, rel=1e-5)


def test_fid_in_one_dimension_is_the_gaussian_closed_form():
    # W2^2 between 1D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2 with sample std (ddof 1)
    x, y = features(50, 70, 1, seed=3)
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert fid(x, y) == pytest.approx(want, rel=1e-9)


def test_fid_of_a_sample_with_itself_is_zero_and_it_grows_with_a_shift():
    x, _ = features(30, 30, 12)
    assert abs(fid(x, x)) < 1e-8
    assert 0 < fid(x, x + 0.1) < fid(x, x + 0.5)


def test_fid_adds_epsilon_to_the_diagonals_when_the_square_root_fails(monkeypatch):
    import lad_fast.evaluate.metrics as metrics

    x, y = features(6, 6, 3)
    real = metrics._trace_sqrt_product
    seen = []

    def flaky(s1, s2):
        seen.append(s1.copy())
        return float("nan") if len(seen) == 1 else real(s1, s2)

    monkeypatch.setattr(metrics, "_trace_sqrt_product", flaky)
    got = fid(x, y, eps=1e-3)
    np.testing.assert_allclose(seen[1] - seen[0], 1e-3 * np.eye(3), atol=1e-12)
    assert np.isfinite(got) and got == pytest.approx(metrics.fid(x, y), rel=1e-2)


def test_fid_is_undefined_below_two_samples():
    x, y = features(5, 1, 4)
    with pytest.raises(
        InputError, match=r"FID is undefined for fewer than 2 samples on a side \(synthetic has 1\)"
    ):
        fid(x, y)


@pytest.mark.parametrize("metric", [fid, mmd])
def test_nan_features_are_refused_in_one_line(metric):
    x, y = features(5, 5, 4)
    x[2, 1] = np.nan
    with pytest.raises(InputError, match=r"^NaN features: the real features hold 1 NaN") as e:
        metric(x, y)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"^NaN features: the synthetic features"):
        metric(y, torch.from_numpy(x))


def test_feature_shapes_are_checked():
    x, y = features(5, 5, 4)
    with pytest.raises(InputError, match=r"differ in width \(4 vs 3\)"):
        fid(x, y[:, :3])
    with pytest.raises(InputError, match=r"real features must be \(N, F\), got shape \(5, 4, 1\)"):
        mmd(x[..., None], y)


# ----------------------------------------------------------------------------------------------- MMD


@pytest.mark.parametrize("n,f", [(10, 4), (6, 50), (32, 17)])
def test_linear_mmd_agrees_with_monai(n, f):
    x, y = features(n, n, f, seed=n)
    ref = MMDMetric()(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert mmd(x, y, kernel="linear") == pytest.approx(ref, rel=1e-6)


def test_linear_mmd_with_unequal_sizes_is_the_unbiased_statistic():
    x, y = features(7, 4, 3, seed=1)
    n, m = len(x), len(y)
    xx = sum(x[i] @ x[j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(y[i] @ y[j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(x[i] @ y[j] for i in range(n) for j in range(m)) / (n * m)
    assert mmd(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_gaussian_mmd_is_the_multi_bandwidth_unbiased_statistic():
    x, y = features(5, 6, 3, seed=2)
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    med = np.median(d2[np.triu_indices(len(z), 1)])
    k = sum(np.exp(-d2 / (c * med)) for c in (0.25, 0.5, 1, 2, 4))
    n, m = 5, 6
    want = (
        (k[:n, :n].sum() - np.trace(k[:n, :n])) / (n * (n - 1))
        + (k[n:, n:].sum() - np.trace(k[n:, n:])) / (m * (m - 1))
        - 2 * k[:n, n:].mean()
    )
    assert mmd(x, y, kernel="gaussian") == pytest.approx(want, rel=1e-9)
    # the median heuristic makes it independent of the feature scale
    assert mmd(1e3 * x, 1e3 * y, kernel="gaussian") == pytest.approx(want, rel=1e-9)


def test_gaussian_mmd_is_zero_in_expectation_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(7)
    draws, n, f = 20, 30, 8

    def mean_mmd(shift: float) -> tuple[float, float]:
        v = [
            mmd(rng.normal(size=(n, f)), rng.normal(size=(n, f)) + shift, kernel="gaussian")
            for _ in range(draws)
        ]
        return float(np.mean(v)), float(np.std(v) / np.sqrt(draws))

    same, se = mean_mmd(0.0)
    assert abs(same) < 3 * se  # unbiased: no offset beyond its standard error
    small, big = mean_mmd(0.3)[0], mean_mmd(1.0)[0]
    assert same + 5 * se < small < big


def test_mmd_refuses_an_unknown_kernel_and_single_samples():
    x, y = features(4, 4, 2)
    with pytest.raises(ConfigError, match="kernel must be 'linear' or 'gaussian', got 'rbf'"):
        mmd(x, y, kernel="rbf")
    with pytest.raises(
        InputError, match=r"MMD is undefined for fewer than 2 samples on a side \(real has 1\)"
    ):
        mmd(x[:1], y, kernel="gaussian")


# ------------------------------------------------------------------------------------------- MS-SSIM


def noisy_pair(
    shape: tuple[int, ...], seed: int = 0, noise: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g) * 2 - 1
    return a, (a + noise * torch.randn(shape, generator=g)).clamp(-1, 1)


THREE_SCALES = (0.0448 / 0.6305, 0.2856 / 0.6305, 0.3001 / 0.6305)  # MONAI's first three, renormalised


@pytest.mark.parametrize(
    "shape,kernel,weights",
    [
        ((3, 1, 16, 64, 64), None, None),  # the tiny preset's settings
        ((2, 1, 20, 40, 33), None, None),  # odd sides, per-axis kernel (5, 9, 7)
        ((2, 2, 24, 24, 24), 5, THREE_SCALES),  # two channels
        ((2, 1, 12, 30, 18), 3, THREE_SCALES),
        ((2, 1, 11, 13, 12), 11, (1.0,)),  # one scale: plain SSIM
    ],
)
def test_ms_ssim_agrees_with_monai(shape, kernel, weights):
    a, b = noisy_pair(shape)
    if kernel is None:
        kernel, weights = ms_ssim_settings(shape[2:])
    ref = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=2.0, kernel_size=kernel, weights=weights, reduction="none"
    )(a, b)
    got = ms_ssim(a, b, kernel_size=kernel, weights=weights)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got, ref.flatten(), rtol=1e-5, atol=1e-6)


def test_ms_ssim_is_one_for_identical_volumes_and_falls_with_noise():
    a, b = noisy_pair((1, 1, 16, 32, 32), noise=0.1)
    _, c = noisy_pair((1, 1, 16, 32, 32), noise=0.5)
    assert ms_ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert 1 > ms_ssim(a, b).item() > ms_ssim(a, c).item() > 0


def test_ms_ssim_settings_at_the_presets():
    # documented in ms_ssim_settings: tiny (16, 64, 64) and lad (32, 256, 256)
    ks, w = ms_ssim_settings((16, 64, 64))
    assert ks == (3, 11, 11) and w == pytest.approx((0.0711, 0.4530, 0.4760), abs=1e-4)
    ks, w = ms_ssim_settings((32, 256, 256))
    assert ks == (3, 11, 11) and w == pytest.approx((0.0517, 0.3295, 0.3462, 0.2726), abs=1e-4)
    assert ms_ssim_settings((176, 200, 180)) == ((11, 11, 11), (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    assert ms_ssim_settings((2 + 1, 4, 5)) == ((3, 3, 5), (1.0,))
    with pytest.raises(ConfigError, match=r"needs at least 3 voxels per side, got \(2, 8, 8\)"):
        ms_ssim_settings((2, 8, 8))


def test_ms_ssim_refuses_settings_too_large_for_the_volume():
    a, b = noisy_pair((1, 1, 16, 64, 64))
    with pytest.raises(ConfigError, match=r"too small for kernel \(11, 11, 11\) at 5 scales"):
        ms_ssim(a, b, kernel_size=11, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    with pytest.raises(ConfigError, match="scales=2 disagrees with 3 weights"):
        ms_ssim(a, b, kernel_size=3, scales=2, weights=(0.2, 0.3, 0.5))
    with pytest.raises(InputError, match=r"got \(1, 1, 16, 64, 64\) and \(1, 1, 16, 64, 63\)"):
        ms_ssim(a, b[..., :63])


def test_ms_ssim_scales_default_to_the_most_the_kernel_fits():
    a, b = noisy_pair((2, 1, 16, 32, 32))
    # kernel 3 on a 16-voxel side: 3 scales (16 // 4 = 4 >= 3); MONAI's weights renormalised over three
    w3 = ms_ssim_settings((16, 64, 64))[1]
    torch.testing.assert_close(ms_ssim(a, b, kernel_size=3), ms_ssim(a, b, kernel_size=3, weights=w3))
    torch.testing.assert_close(
        ms_ssim(a, b, kernel_size=3, scales=3), ms_ssim(a, b, kernel_size=3, weights=w3)
    )


# ----------------------------------------------------------------------------------------- diversity


def test_diversity_is_the_mean_pairwise_ms_ssim():
    g = torch.Generator().manual_seed(1)
    vols = torch.rand(4, 1, 8, 16, 16, generator=g) * 2 - 1
    want = np.mean([ms_ssim(vols[[i]], vols[[j]]).item() for i, j in combinations(range(4), 2)])
    assert diversity(vols, batch_size=4) == pytest.approx(want, rel=1e-6)
    assert diversity(vols[[0, 0, 0]]) == pytest.approx(1.0, abs=1e-6)  # no diversity at all


def test_diversity_samples_a_fixed_set_of_pairs_when_there_are_many():
    g = torch.Generator().manual_seed(2)
    vols = torch.rand(12, 1, 8, 16, 16, generator=g) * 2 - 1
    a = diversity(vols, max_pairs=10, seed=0)
    assert a == diversity(vols, max_pairs=10, seed=0)
    assert a != diversity(vols, max_pairs=10, seed=1)
    assert a == pytest.approx(diversity(vols), abs=0.05)  # a sample of the 66 pairs estimates their mean


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ms_ssim_on_cuda_matches_the_cpu():
    a, b = noisy_pair((2, 1, 16, 64, 64))
    torch.testing.assert_close(ms_ssim(a.cuda(), b.cuda()).cpu(), ms_ssim(a, b), rtol=1e-4, atol=1e-5)


def test_pair_unranking_enumerates_all_pairs_in_order():
    assert [_unrank_pair(r, 5) for r in range(10)] == list(combinations(range(5), 2))


def test_diversity_needs_two_volumes():
    with pytest.raises(InputError, match="diversity is undefined for fewer than 2 volumes, got 1"):
        diversity(torch.zeros(1, 1, 8, 8, 8))
