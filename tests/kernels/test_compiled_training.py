"""One compiled training step (loss + backward + optimizer step) of a tiny VQ-GAN and a tiny U-Net.

The step runs under ``torch.compile`` with every block on ``impl="triton"`` (the Triton interpreter on
CPU) and is checked against the same step with ``impl="torch"``, compiled the same way:

- the Triton step breaks the graph exactly where the torch step does (PyTorch's optimizer inserts its
  own deliberate breaks around ``step()``), so the lad_fast ops add no graph break, and each op appears
  as a node inside the captured graphs rather than running between them;
- the loss is finite and equal, and every gradient and updated parameter matches within the fp32 row
  of the tolerance table.

The backend is "aot_eager": inductor on CPU compiles C++ for every graph, which takes minutes on two
cores, while aot_eager runs the same dynamo capture and AOT-autograd tracing the real training uses.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.config import ConditionConfig, UNetConfig, VQGANConfig
from lad_fast.kernels import _conv3d_triton
from lad_fast.models.blocks import set_impl
from lad_fast.models.unet import LatentUNet
from lad_fast.models.vqgan import VQGAN


class _GraphRecorder:
    """A torch.compile backend that keeps every captured graph and then runs it through aot_eager."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def lad_fast_ops(self) -> Counter:
        """How many times each ``lad_fast::`` custom op was captured as a node inside a graph."""
        names = (
            str(node.target) for g in self.graphs for node in g.graph.nodes if node.op == "call_function"
        )
        return Counter(name.removeprefix("lad_fast.").split(".")[0] for name in names if "lad_fast" in name)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, *batch) -> torch.Tensor:
    loss = loss_fn(model, *batch)
    value = loss.detach()  # returned detached: the graph before the optimizer break must not keep it alive
    loss.backward()
    opt.step()
    return value


def _compiled_step(model: nn.Module, loss_fn: Callable, batch: tuple, seed: int):
    """One compiled step -> (loss, grads, params after it, buffers, graph-break reasons, recorder)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recorder = _GraphRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(_train_step, backend=recorder)
    torch.manual_seed(seed)  # the VQ-GAN's dead-code restart draws random batch vectors
    loss = step(model, opt, loss_fn, *batch)
    breaks = Counter(dict(torch._dynamo.utils.counters["graph_break"]))
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return loss, grads, params, buffers, breaks, recorder


def _dynamo_config():
    # Tracing loss.backward() inside the compiled step needs trace_autograd_ops (torch >= 2.12); the
    # quantiser's bincount has a data-dependent output shape. Options this torch lacks are left out:
    # the comparison with the torch step below still isolates what the lad_fast ops do.
    wanted = {"trace_autograd_ops": True, "capture_dynamic_output_shape_ops": True}
    return torch._dynamo.config.patch({k: v for k, v in wanted.items() if hasattr(torch._dynamo.config, k)})


def _check_against_torch(model: nn.Module, loss_fn: Callable, batch: tuple, expected_ops: set[str], close):
    reference = set_impl(copy.deepcopy(model), "torch")
    set_impl(model, "triton")
    with _dynamo_config():
        want = _compiled_step(reference, loss_fn, batch, seed=0)
        got = _compiled_step(model, loss_fn, batch, seed=0)
    loss, grads, params, buffers, breaks, recorder = got
    ref_loss, ref_grads, ref_params, ref_buffers, ref_breaks, ref_recorder = want

    # Zero graph breaks from the lad_fast ops: the same breaks as the torch step, and every op inside a graph.
    assert breaks == ref_breaks, f"triton step breaks {dict(breaks)}, torch step breaks {dict(ref_breaks)}"
    assert len(recorder.graphs) == len(ref_recorder.graphs)
    assert not ref_recorder.lad_fast_ops()
    assert set(recorder.lad_fast_ops()) == expected_ops, recorder.lad_fast_ops()

    assert torch.isfinite(loss)
    close(loss, ref_loss, torch.float32)
    assert grads.keys() == ref_grads.keys()
    assert all(g.abs().sum() > 0 for g in ref_grads.values()), "a zero gradient would make this test vacuous"
    for name, g in grads.items():
        close(g, ref_grads[name], torch.float32)
        close(params[name], ref_params[name], torch.float32)
    for name, b in buffers.items():
        close(b, ref_buffers[name], torch.float32)


@pytest.fixture(autouse=True)
def _fast_interpreted_conv(monkeypatch):
    # The interpreter's cost is per program: one 256-row tile covers a whole tiny level. The kernel tests
    # in test_conv3d.py keep the small default tile so that they span several row blocks.
    monkeypatch.setitem(_conv3d_triton._INTERP_CONV, "BLOCK_M", 256)


def _vqgan_loss(model: VQGAN, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.l1_loss(out.recon, x) + out.vq_loss


def test_vqgan_step(device, close):
    torch.manual_seed(0)
    cfg = VQGANConfig(channels=(4, 8), groups=4, latent_channels=4, code_dim=4, codebook_size=16)
    model = VQGAN(cfg).to(device)
    x = torch.randn(1, 1, 4, 8, 8, device=device)
    _check_against_torch(model, _vqgan_loss, (x,), {"conv3d", "norm_act_conv3d", "vq_nearest"}, close)


def _unet_loss(model: LatentUNet, x, t, content, structure, target) -> torch.Tensor:
    pred = model(x, t, model.embed_condition(content, structure))
    return F.mse_loss(pred, target)


def test_unet_step(device, close):
    torch.manual_seed(0)
    cfg = UNetConfig(
        channels=8, multipliers=(1, 2), attention_levels=(1,), heads=2, head_dim=16, groups=4, time_dim=16
    )
    model = LatentUNet(cfg, ConditionConfig(content_dim=4, embed_dim=8), latent_channels=4, structure_dim=3)
    # The output conv and the FiLM projections start at zero, which would zero most gradients and leave
    # the backward of the kernels untested: give every all-zero parameter small random values.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    x, content, target = (torch.randn(1, 4, 2, 4, 4, generator=g).to(device) for _ in range(3))
    structure = torch.randn(1, 3, generator=g).to(device)
    t = torch.tensor([7], device=device)
    batch = (x, t, content, structure, target)
    _check_against_torch(model, _unet_loss, batch, {"conv3d", "norm_act_conv3d", "attention_fwd"}, close)
