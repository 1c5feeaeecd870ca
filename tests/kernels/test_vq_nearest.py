"""vq_nearest: the Triton kernel (interpreter on CPU) against the PyTorch reference and exact answers."""

from __future__ import annotations

import pytest
import torch

from lad_fast.errors import BackendUnavailableError, ConfigError
from lad_fast.kernels import vq_nearest, vq_nearest_ref

# The kernels run where the tests find CUDA, else in the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lattice_case(n: int, k: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Distinct codes on a 0.5-spaced lattice and z = a known code + noise far below half the spacing.

    The nearest code is then known exactly (no float ties, whatever the summation order), so indices
    can be compared for equality.
    """
    g = torch.Generator().manual_seed(seed)
    side = 9  # lattice values -2.0, -1.5, ..., 2.0
    digits = torch.randint(0, side, (k, d), generator=g)
    while torch.unique(digits, dim=0).shape[0] < k:  # redraw until the k codes are distinct
        digits = torch.randint(0, side, (k, d), generator=g)
    codebook = (digits.float() - side // 2) * 0.5
    target = torch.randint(0, k, (n,), generator=g)
    z = codebook[target] + 0.05 * (torch.rand(n, d, generator=g) * 2 - 1)
    return z.to(DEVICE, dtype), codebook.to(DEVICE, dtype), target.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [3, 8])
@pytest.mark.parametrize("k", [5, 17, 64])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_matches_reference(n, k, d, dtype, close):
    z, codebook, target = _lattice_case(n, k, d, dtype, seed=n * 1000 + k * 10 + d)
    idx, dist = vq_nearest(z, codebook, impl="triton")
    ref_idx, _ = vq_nearest_ref(z, codebook)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == dist.shape == (n,)
    assert torch.equal(idx, target)
    assert torch.equal(idx, ref_idx)
    # Distances against float64 (from the same rounded inputs): exact squared distance to the code.
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    zz, cc = z.to(oracle_dtype), codebook.to(oracle_dtype)
    close(dist, ((zz - cc[target]) ** 2).sum(1), dtype)


@pytest.mark.parametrize("chunk", [1, 40, 1 << 22])
def test_reference_row_chunks(chunk, monkeypatch, close):
    """The reference's row chunks (one row, several with a ragged last one, all rows) agree with float64."""
    import importlib

    monkeypatch.setattr(importlib.import_module("lad_fast.kernels.vq_nearest"), "REF_CHUNK", chunk)
    z, codebook, target = _lattice_case(33, 17, 5, torch.float32, seed=5)
    idx, dist = vq_nearest_ref(z, codebook)
    assert torch.equal(idx, target)
    assert dist.dtype == torch.float32 and dist.shape == (33,)
    close(dist, ((z.double() - codebook.double()[target]) ** 2).sum(1), torch.float32)
    assert vq_nearest_ref(z[:0], codebook)[0].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_ties_pick_lowest_index(dtype):
    # Duplicates in one codebook block (3, 9) and across blocks (5, 40): bitwise-equal scores.
    codebook = torch.randn(48, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    codebook[9] = codebook[3]
    codebook[40] = codebook[5]
    codebook = codebook.to(dtype)
    z = codebook[[3, 9, 5, 40]].clone()
    idx, dist = vq_nearest(z, codebook, impl="triton")
    assert idx.tolist() == [3, 3, 5, 5]
    ref_idx, _ = vq_nearest_ref(z, codebook)
    assert torch.equal(idx, ref_idx)
    assert dist.max().item() < 1e-4


def test_non_contiguous_inputs(close):
    z_full, cb_full, target = _lattice_case(13, 20, 6, torch.float32, seed=3)
    z = z_full.t().contiguous().t()  # column-major view of the same values
    codebook = torch.stack([cb_full, torch.zeros_like(cb_full)], dim=1).reshape(40, 6)[::2]  # stride 2
    assert not z.is_contiguous() and not codebook.is_contiguous()
    idx, dist = vq_nearest(z, codebook, impl="triton")
    assert torch.equal(idx, target)
    ref_idx, ref_dist = vq_nearest_ref(z_full.double(), cb_full.double())
    assert torch.equal(idx, ref_idx)
    close(dist, ref_dist, torch.float32)


def test_wide_codes_and_empty_rows(close):
    z, codebook, target = _lattice_case(5, 9, 40, torch.float32, seed=4)  # D padded to 64 in the kernel
    idx, dist = vq_nearest(z, codebook, impl="triton")
    assert torch.equal(idx, target)
    close(dist, ((z.double() - codebook.double()[target]) ** 2).sum(1), torch.float32)
    idx, dist = vq_nearest(z[:0], codebook, impl="triton")
    assert idx.shape == dist.shape == (0,)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_outputs_carry_no_gradient(impl):
    z, codebook, _ = _lattice_case(7, 5, 3, torch.float32)
    z.requires_grad_(True)
    codebook.requires_grad_(True)
    idx, dist = vq_nearest(z, codebook, impl=impl)
    assert not idx.requires_grad and not dist.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and the compiled kernel need CUDA")
def test_bf16_on_cuda(close):
    z, codebook, target = _lattice_case(257, 300, 8, torch.bfloat16)
    idx, dist = vq_nearest(z.cuda(), codebook.cuda(), impl="triton")
    assert torch.equal(idx, target)
    close(dist, ((z.float() - codebook.float()[target]) ** 2).sum(1), torch.bfloat16)


def test_errors_name_the_problem():
    z, codebook, _ = _lattice_case(4, 5, 3, torch.float32)
    with pytest.raises(ConfigError, match=r"z \(N, D\) and codebook \(K, D\)"):
        vq_nearest(z[None], codebook, impl="triton")
    with pytest.raises(ConfigError, match="3 dims per row but the codebook has 4"):
        vq_nearest(z, torch.zeros(5, 4), impl="triton")
    with pytest.raises(ConfigError, match="share one dtype"):
        vq_nearest(z, codebook.half(), impl="triton")
    with pytest.raises(ConfigError, match="share one dtype"):
        vq_nearest(z.double(), codebook.double(), impl="triton")
    with pytest.raises(ConfigError, match="move them together"):
        vq_nearest(z, codebook.to("meta"), impl="triton")
    with pytest.raises(ConfigError, match="codebook is empty"):
        vq_nearest(z, codebook[:0], impl="triton")
    with pytest.raises(ConfigError, match="code dims up to 256"):
        vq_nearest(z.new_zeros(2, 257), z.new_zeros(3, 257), impl="triton")
    with pytest.raises(ConfigError, match="impl must be one of"):
        vq_nearest(z, codebook, impl="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    z, codebook, _ = _lattice_case(4, 5, 3, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="set TRITON_INTERPRET=1"):
        vq_nearest(z, codebook, impl="triton")


def test_autotune_pruning_keeps_fitting_tiles():
    import triton

    from lad_fast.kernels import _vq_triton

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}) for bn in (64, 128) for bk in (64, 128, 256)]
    assert _vq_triton._prune(configs, {"N_BUCKET": 65536, "K": 16384}, BLOCK_D=16) == configs
    small = _vq_triton._prune(configs, {"N_BUCKET": 16, "K": 100}, BLOCK_D=16)
    assert small and all(c.kwargs["BLOCK_N"] == 64 and c.kwargs["BLOCK_K"] <= 128 for c in small)
    wide = _vq_triton._prune(configs, {"N_BUCKET": 65536, "K": 16384}, BLOCK_D=256)
    assert wide and all(c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 64 for c in wide)


def test_autotune_key_holds_the_row_bucket_the_prune_reads():
    from lad_fast.kernels import _vq_triton

    assert "N_BUCKET" in _vq_triton._vq_tuned.keys and "N" not in _vq_triton._vq_tuned.keys


def _launch(z, codebook, fast):
    from lad_fast.kernels import _vq_triton

    n = z.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)
    count = _vq_triton.launch(z, codebook, codebook.pow(2).sum(1), idx, dist, fast=fast)
    return idx, dist, count


def test_fast_fp32_pass_rechecks_near_ties_exactly(close):
    """Rows whose best two codes are closer than the TF32 error bound go through the exact fp32 pass."""
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(40, 8, generator=g)
    codebook, clear_noise = codebook.to(DEVICE), (0.01 * torch.randn(2, 8, generator=g)).to(DEVICE)
    codebook[21] = codebook[4] + 1e-4  # a near-duplicate in another block: a gap far below the bound
    codebook[30] = codebook[12]  # an exact duplicate: the lower index must win
    z = torch.cat([codebook[[4, 21, 12, 30]] + 1e-6, codebook[[0, 7]] + clear_noise])
    idx, dist, count = _launch(z, codebook, fast=True)
    ref_idx, ref_dist = vq_nearest_ref(z.double(), codebook.double())
    assert 4 <= int(count) < z.shape[0]  # the four near-tie rows, not the clear ones
    assert torch.equal(idx, ref_idx)
    assert idx[2].item() == idx[3].item() == 12
    close(dist, ref_dist, torch.float32)
    plain_idx, plain_dist, none = _launch(z, codebook, fast=False)
    assert none is None and torch.equal(plain_idx, idx)
    close(plain_dist, dist, torch.float32)
