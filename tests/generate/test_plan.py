"""Generation plans: the sampling batch (guidance doubles the U-Net's), the decode against a real one, and
the whole-or-tiled choice that ``generate`` takes from the plan on a (fake) small GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lad_fast.config import SamplingConfig, get_preset
from lad_fast.errors import ConfigError
from lad_fast.generate.plan import (
    choose_decode,
    example_tile,
    plan_decode,
    plan_generation,
    plan_sampling,
    weights,
)
from lad_fast.models.vqgan import VQGAN
from lad_fast.utils.fake_trace import TensorTracker
from lad_fast.utils.gpu_specs import GPU, GiB


@pytest.fixture(scope="module")
def tiny():
    return get_preset("tiny")


def test_guidance_runs_both_branches_in_one_batch(tiny):
    guided = plan_sampling(tiny, 2)  # tiny: euler, 30 steps, guidance 3
    assert (guided.unet_batch, guided.calls, guided.steps) == (4, 30, 30)
    plain = plan_sampling(replace(tiny, sampling=replace(tiny.sampling, guidance=1.0)), 2)
    assert plain.unet_batch == 2 and plain.calls == 30
    assert guided.peak_by["activations"] > plain.peak_by["activations"]
    assert guided.flops > 1.9 * plain.flops
    assert guided.peak_at(4) > guided.peak and guided.weights == plain.weights > 0


def test_a_sampler_without_steps_calls_the_unet_at_every_timestep(tiny):
    ddpm = replace(
        tiny,
        diffusion=replace(tiny.diffusion, objective="ddpm", timesteps=20),
        sampling=SamplingConfig(sampler="ddpm", steps=50, guidance=1.0),
    )
    plan = plan_sampling(ddpm, 1)
    assert plan.calls == plan.steps == 20


def test_the_planned_whole_decode_matches_a_real_one(tiny, monkeypatch):
    # oneDNN's batch-1 convolution takes no Python dispatch mode, so it is off for this measurement
    monkeypatch.setenv("LAD_FAST_ONEDNN_BATCH1", "0")
    plan = plan_decode(tiny, None, gpu=False)
    vq = VQGAN(tiny.vqgan).eval()
    f = 2 ** (len(tiny.vqgan.channels) - 1)
    latent = (tiny.vqgan.code_dim, *(s // f for s in tiny.geometry.shape))
    tracker = TensorTracker()
    tracker.track(weights(vq), "weights")
    with torch.no_grad(), tracker:
        vq.decode(vq.quantize(vq.from_unit(torch.zeros(1, *latent))))
    assert abs(plan.peak - tracker.trace.peak) <= 0.25 * tracker.trace.peak
    assert plan.weights == tracker.trace.peak_by["weights"]


def test_smaller_tiles_need_less_memory(tiny):
    whole = plan_decode(tiny)
    small, smaller = plan_decode(tiny, 2), plan_decode(tiny, 1)
    assert smaller.working < small.working < whole.working
    assert small.flops > whole.flops  # the overlaps are decoded more than once
    assert example_tile(tiny) == 2  # an eighth of the 16-voxel latent side


def test_decoding_is_whole_when_it_fits(tiny):
    whole = plan_decode(tiny)
    assert choose_decode(tiny, whole.working).tile is None


def test_decoding_is_tiled_on_a_small_gpu(tiny):
    """A budget under the whole decode: the largest tile whose planned working memory fits."""
    whole = plan_decode(tiny)
    budget = int(0.6 * whole.working)
    plan = choose_decode(tiny, budget)
    assert plan.tile is not None and plan.working <= budget
    assert plan_decode(tiny, plan.tile + 1).working > budget


def test_no_room_for_decoding_is_refused(tiny):
    with pytest.raises(
        ConfigError, match=r"no GPU memory is left for decoding beside sampling \(-1 MiB\); lower --batch"
    ):
        choose_decode(tiny, -(2**20))


def test_generation_plan_per_gpu(tiny):
    plan = plan_generation(tiny, 2)
    big = GPU("big", 8 * GiB, 1e14, 1e12)
    assert plan.decode_choice(tiny, big) is plan.whole
    assert plan.volumes_per_hour(big) > 0
    assert plan.largest_batch(big) > 2
    tiny_gpu = GPU("small", plan.sampling.peak // 2)
    assert plan.decode_choice(tiny, tiny_gpu) is None and plan.largest_batch(tiny_gpu) == 0
    assert plan.volumes_per_hour(tiny_gpu) is None  # no rates: memory only


def test_generate_on_cuda_decodes_as_the_plan_decides(tiny, monkeypatch):
    """planned_tile, what generate calls on CUDA: whole with room to spare, the chosen tile on a GPU
    whose free memory leaves less than the whole decode, a refusal without room; nothing with a budget
    set by hand (the per-volume estimate applies)."""
    from lad_fast.generate.plan import plan_sampling, planned_tile
    from lad_fast.generate.tiled import BUDGET_ENV
    from lad_fast.utils.gpu_specs import FIT_FRACTION

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    sampling, whole = plan_sampling(tiny, 2), plan_decode(tiny)
    total = 80 * GiB
    kept = int((1 - FIT_FRACTION) * total)  # decode_budget keeps this share free
    beside = sampling.peak - sampling.weights

    def free(memory: int) -> None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory, total))

    free(total)
    assert planned_tile(tiny, cuda, 2) == 0
    free(kept + beside + int(0.6 * whole.working))
    tile = planned_tile(tiny, cuda, 2)
    assert tile == choose_decode(tiny, int(0.6 * whole.working)).tile and tile >= 1
    free(kept)
    with pytest.raises(ConfigError, match="no GPU memory is left for decoding beside sampling"):
        planned_tile(tiny, cuda, 2)
    monkeypatch.setenv(BUDGET_ENV, "64")
    assert planned_tile(tiny, cuda, 2) is None
