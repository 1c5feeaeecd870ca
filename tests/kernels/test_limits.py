"""The autotune prunes hold their configs to a GPU's limits (``kernels/_limits.py``) when given a target.

These run the prune functions alone, on CPU tensors (no compile): that a target reaches the estimates, and
that without one (the interpreter, CPU tensors) nothing but the problem's shape prunes. Whether the
estimates are right is what the compile check measures (test_compile_aot.py, bench/compile_sweep.py).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the prunes take triton.Config lists")

from lad_fast.kernels import _attention_triton as ka  # noqa: E402
from lad_fast.kernels import _conv3d_bwd_triton as kb  # noqa: E402
from lad_fast.kernels import _conv3d_triton as kt  # noqa: E402
from lad_fast.kernels import _limits  # noqa: E402
from lad_fast.kernels import _vq_triton as kv  # noqa: E402

# dtype paths: (element tensor, IEEE)
PATHS = {
    "fp16": (torch.float16, False),
    "fp32-tf32": (torch.float32, False),
    "fp32-ieee": (torch.float32, True),
}


def _gpu_configs(module, *args) -> list:
    """A kernel's GPU config list (under the interpreter the modules list one small config instead)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "interpreter_on", lambda: False)
        return module._configs(*args)


# as the @triton.autotune decorators of _attention_triton.py and _vq_triton.py list them
ATTENTION_CONFIGS = {
    "fwd": _gpu_configs(ka, (64, 128), (32, 64, 128), "BLOCK_M", "BLOCK_N"),
    "dkdv": _gpu_configs(ka, (64, 128), (32, 64), "BLOCK_N", "BLOCK_M"),
    "dq": _gpu_configs(ka, (64, 128), (32, 64), "BLOCK_M", "BLOCK_N"),
}
VQ_CONFIGS = _gpu_configs(kv)


def _kept(kernel: str, path: str, target: _limits.Target | None) -> tuple[list, list[int]]:
    """The configs a kernel's prune keeps at a ``lad``-sized launch (128 channels, 512 tokens of 64, 16384
    codes of 8), and the shared memory the kernel's estimate gives each."""
    dtype, ieee = PATHS[path]
    x = torch.empty(1, dtype=dtype)
    elem, arch = x.element_size(), target.arch if target else 90
    if kernel == "conv3d":
        configs = kt._conv3d_tuned.configs
        kept = kt._prune_conv_configs(configs, {"O": 128, "C": 128, "x_ptr": x}, target, IEEE=ieee, NORM=True)
        return kept, [kt.gemm_smem(c, arch, elem, ieee, True) for c in kept]
    if kernel == "dgrad":
        kept = kb._prune_dgrad(kb._dgrad_tuned.configs, {"O": 128, "C": 128, "dy_ptr": x}, target, IEEE=ieee)
        return kept, [kt.gemm_smem(c, arch, elem, ieee, False) for c in kept]
    if kernel == "wgrad":
        configs = kb._wgrad_tuned.configs
        kept = kb._prune_wgrad(configs, {"O": 128, "C": 128, "dy_ptr": x}, target, IEEE=ieee, NORM=True)
        return kept, [kb.wgrad_smem(c, arch, elem, ieee, True) for c in kept]
    if kernel == "vq":
        args = {"N_BUCKET": 65536, "K": 16384, "Z": x}
        kept = kv._prune(VQ_CONFIGS, args, target, BLOCK_D=16, IEEE=ieee, FAST=not ieee)
        return kept, [kv.vq_smem(c, 16, arch, elem, ieee) for c in kept]
    owner, sweep = ("BLOCK_N", "BLOCK_M") if kernel == "dkdv" else ("BLOCK_M", "BLOCK_N")
    prune = ka._make_prune(owner, sweep, kernel)
    kept = prune(ATTENTION_CONFIGS[kernel], {"L": 512, "Q": x}, target, HEAD_DIM=64, IEEE=ieee)
    smem = [
        ka.attention_smem(c.kwargs[owner], c.kwargs[sweep], 64, c.num_stages, arch, elem, ieee, kernel)
        for c in kept
    ]
    return kept, smem


KERNELS = ("conv3d", "dgrad", "wgrad", "vq", "fwd", "dkdv", "dq")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("target", list(_limits.TARGETS))
def test_prune_keeps_configs_within_the_targets_shared_memory(kernel, target):
    for path in PATHS:
        kept, smem = _kept(kernel, path, _limits.TARGETS[target])
        assert kept, (kernel, path)
        assert max(smem) <= _limits.TARGETS[target].smem_per_block, (kernel, path)


def test_the_target_and_the_product_path_reach_the_prune():
    sm80, sm90 = _limits.TARGETS["sm_80"], _limits.TARGETS["sm_90"]
    # the H100's 227 KB keep conv tiles that the A100's 163 KB cannot hold
    assert len(_kept("conv3d", "fp16", sm90)[0]) > len(_kept("conv3d", "fp16", sm80)[0])
    # exact fp32 products hold their operands in registers: fewer tiles than TF32 on every kernel
    for kernel in ("conv3d", "dgrad", "wgrad", "fwd", "dkdv", "dq"):
        assert len(_kept(kernel, "fp32-ieee", sm90)[0]) < len(_kept(kernel, "fp32-tf32", sm90)[0]), kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_without_a_gpu_only_the_problem_prunes(kernel):
    """CPU tensors and no target (the interpreter): no hardware bound, so more configs than on any GPU."""
    assert _limits.device_target({"x": torch.empty(1)}) is None
    for path in PATHS:
        free = _kept(kernel, path, None)[0]
        assert all(len(free) >= len(_kept(kernel, path, t)[0]) for t in _limits.TARGETS.values())
    assert any(
        len(_kept(kernel, p, None)[0]) > len(_kept(kernel, p, _limits.TARGETS["sm_80"])[0]) for p in PATHS
    )


def test_select_keeps_a_config_that_runs_when_none_of_the_kept_fits():
    fits = lambda c: c <= 2  # noqa: E731
    assert _limits.select([1, 2, 3], [0, 1, 2, 3], fits) == [1, 2]
    assert _limits.select([3, 4], [5, 2, 1], fits) == [2]  # the first of the whole list that fits
    assert _limits.select([3, 4], [5, 6], fits) == [5]  # nothing fits: the first, as without a target


def test_table_target_takes_the_nearest_listed_architecture_below():
    assert _limits.table_target(86) == _limits.TARGETS["sm_80"]
    assert _limits.table_target(90) == _limits.TARGETS["sm_90"]
    assert _limits.table_target(120) == _limits.TARGETS["sm_100"]
