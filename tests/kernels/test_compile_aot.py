"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 within the target's limits (no GPU).

The interpreter tests check the kernels' arithmetic; this checks that they run on a GPU at all: a
representative subset of the compile sweep (``lad_fast.kernels.aot.ci_subset``; the sweep is
``bench/compile_sweep.py``) compiled with ``triton.compile`` for a ``GPUTarget``: every kernel, forward
and backward, on both targets, each dtype path on each target, and for each of those the config with the
largest tiles that the kernel's own prune keeps for the target at the shapes the ``tiny``, ``lad`` and
``lad-official`` models launch in training. The compiles run in a subprocess without ``TRITON_INTERPRET``
(the interpreter replaces every ``@triton.jit``), in two worker processes: about 20 compiles, under a
minute on two CPU cores.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton", reason="the compile check needs triton (pip install 'lad-fast[triton]')")

from lad_fast.errors import BackendUnavailableError, ConfigError  # noqa: E402
from lad_fast.kernels import _limits, aot  # noqa: E402
from lad_fast.models.kernel_calls import kernel_calls  # noqa: E402

TARGETS = ("sm_80", "sm_90")
DOT_KERNELS = {
    "_conv3d_kernel", "_dgrad_kernel", "_wgrad_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel", "_vq_nearest_kernel",
}  # fmt: skip


@pytest.fixture(scope="module")
def records() -> list[dict]:
    workers = max(1, min(2, os.cpu_count() or 1))
    calls = {preset: kernel_calls(preset) for preset in aot.PRESETS}
    result = aot.check(calls, targets=TARGETS, subset="ci", workers=workers, timeout=240)
    assert len(result["records"]) == result["planned"]
    return result["records"]


def _where(rec: dict) -> str:
    return f"{rec['kernel']} {rec['path']} {rec['target']} {rec['config']}"


def test_subset_covers_every_kernel_dtype_path_and_target(records):
    kernels = {r["kernel"] for r in records}
    assert kernels == aot.kernel_names()  # every @triton.jit kernel of the package, forward and backward
    for target in TARGETS:
        on = [r for r in records if r["target"] == target]
        assert {r["kernel"] for r in on} >= DOT_KERNELS, target
        assert set(aot.DOT_PATHS) <= {r["path"] for r in on}, target


def test_every_config_compiles(records):
    failed = [f"{_where(r)}: {r['error']}" for r in records if r["error"]]
    assert not failed, "\n".join(failed)


def test_shared_memory_within_the_targets_per_block_limit(records):
    over = [
        f"{_where(r)}: {r['shared']} B > {_limits.TARGETS[r['target']].smem_per_block} B"
        for r in records
        if not r["error"] and r["shared"] > _limits.TARGETS[r["target"]].smem_per_block
    ]
    assert not over, "\n".join(over)


def test_register_spills_within_bound(records):
    spills = [
        f"{_where(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
        for r in records
        if not r["error"] and max(r["spill_stores"], r["spill_loads"]) > _limits.MAX_SPILL_BYTES
    ]
    assert not spills, f"spills above {_limits.MAX_SPILL_BYTES} B per thread:\n" + "\n".join(spills)


def test_tensor_core_dots_use_tensor_cores(records):
    dots = [r for r in records if r["tensor_core_expected"] and not r["error"]]
    assert {r["kernel"] for r in dots} == DOT_KERNELS  # every dot kernel has a tensor-core path here
    missing = [_where(r) for r in dots if not r["tensor_core"]]
    assert not missing, "fp16 / bf16 / TF32 tl.dot without mma / wgmma in its PTX:\n" + "\n".join(missing)
    # fp32 "ieee" products are FMAs: a tensor-core instruction there would mean the flag is ignored
    assert not [_where(r) for r in records if r["IEEE"] is True and r["tensor_core"]]


@pytest.mark.parametrize("target", TARGETS)
def test_vq_fast_pass_compiles(records, target):
    """The default fp32 path of vq_nearest (TF32 pass, FAST=True) reads module-level constants inside
    @triton.jit: the interpreter accepts any Python value there, a compile only ``tl.constexpr`` ones."""
    fast = [r for r in records if r["kernel"] == "_vq_nearest_kernel" and r["flags"].get("FAST") is True]
    on = [r for r in fast if r["target"] == target]
    assert on, f"no FAST=True compile of _vq_nearest_kernel for {target}"
    assert all(r["error"] is None and r["tensor_core"] for r in on), [r["error"] for r in on]


def test_problems_flags_each_kind_of_defect():
    """The verdict itself: each defect the check exists for is reported (a check that cannot fail is none)."""
    ok = {
        "kernel": "k", "path": "fp16", "target": "sm_80", "config": {}, "error": None, "shared": 1024,
        "spill_stores": 0, "spill_loads": 0, "tensor_core": {"mma.sync": 4}, "tensor_core_expected": True,
    }  # fmt: skip
    assert aot.problems(ok) == []
    assert "compile failed" in aot.problems({**ok, "error": "CompilationError: boom"})[0]
    assert "per-block limit 166912" in aot.problems({**ok, "shared": 166_913})[0]
    assert aot.problems({**ok, "target": "sm_90", "shared": 166_913}) == []
    assert "spills" in aot.problems({**ok, "spill_stores": _limits.MAX_SPILL_BYTES + 4})[0]
    assert "tensor-core" in aot.problems({**ok, "tensor_core": {}})[0]
    assert aot.problems({**ok, "tensor_core": {}, "tensor_core_expected": False}) == []


def test_steps_that_compile_refuse_the_interpreter():
    """This process runs the interpreter (tests/conftest.py): launches replayed here would take the
    interpreter's branches of the launchers, so the compile steps refuse instead of planning wrong jobs."""
    with pytest.raises(BackendUnavailableError, match="without its interpreter"):
        aot.kernel_launches([], "fp16")


def test_without_triton_the_check_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(aot, "triton_available", lambda: False)
    with pytest.raises(
        BackendUnavailableError, match=r"compiles with Triton: pip install .*lad-fast\[triton\]"
    ):
        aot.check({})


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown sm_75; .* targets sm_80, sm_90"):
        aot.check({}, targets=["sm_75"])
    with pytest.raises(ConfigError, match="unknown _no_such_kernel; .* kernels .*_conv3d_kernel"):
        aot.check({}, kernels={"_no_such_kernel"})
    with pytest.raises(ConfigError, match="unknown subset 'most'"):
        aot.check({}, subset="most")


def test_a_kernel_no_call_launches_is_refused():
    launched = aot.kernel_names() - {"_wgrad_kernel"}
    with pytest.raises(ConfigError, match="would not compile _wgrad_kernel: no recorded op call launches"):
        aot.check_coverage(launched)
    aot.check_coverage(aot.kernel_names())


def test_frontier_keeps_the_configs_no_other_dominates():
    def item(bm: int, bn: int, stages: int, warps: int, arch: int = 90) -> aot.Planned:
        config = (("BLOCK_M", bm), ("BLOCK_N", bn), ("num_stages", stages), ("num_warps", warps))
        job = aot.Job("m", "h", "k", "fp16", arch, (), config, config)
        return aot.Planned(job, ["tiny"], 1)

    big, wide, deep = item(128, 64, 3, 4), item(64, 128, 3, 4), item(64, 64, 4, 4)
    small, more_warps = item(64, 64, 3, 4), item(64, 64, 3, 8)
    other_target = item(64, 64, 3, 4, arch=80)
    kept = aot.frontier([big, wide, deep, small, more_warps, other_target])
    # small: dominated by big, wide and deep; more_warps: the same tiles as small over more warps (fewer
    # registers per thread); other_target: alone on its target
    assert kept == [big, wide, deep, other_target]
