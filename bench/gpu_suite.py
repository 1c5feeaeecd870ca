"""Steps of the prepared GPU check (``bench/gpu_suite.sh`` runs them; see its header for the whole plan).

    python bench/gpu_suite.py STEP --out DIR [--tiny]

Steps: ``env`` (device and versions), ``kernels`` (Triton against the PyTorch paths, forward and
forward+backward: the fused GroupNorm+SiLU+conv against the cuDNN conv + GroupNorm + SiLU chain, conv3d
against cuDNN, attention against SDPA flash, vq_nearest against cdist+argmin), ``train`` (one compiled
bf16 training step of the VQ-GAN and of the U-Net with ``impl="triton"`` and ``impl="torch"``: time and
peak memory), ``calibrate`` (each model's real training step at ``lad`` against ``lad-fast plan``'s
predicted peak and time: the plan's calibration) and ``topology`` (the structure vector's torch GPU path
against the numpy path). Each
step appends JSON lines, every one carrying device and versions, to ``DIR/<step>.jsonl``.

``--tiny`` runs the same code at tiny shapes: on a CPU the Triton kernels run in the interpreter
(fp32, since bf16 is silently wrong there), timings come from ``time.perf_counter`` and no memory is
measured; that is the ``--cpu-dry-run`` of the shell script, which CI runs so that this cannot rot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import dtype_name, environment, peak_extra_mib, time_ms

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
# The suite runs in a fixed budget: fewer milliseconds of warm-up and repetition than the per-op scripts.
WARMUP_MS, REP_MS = 10, 50


# --------------------------------------------------------------------------------------- recording


class Sink:
    """Appends one JSON line per record to ``out/<step>.jsonl``, environment merged in, and echoes it."""

    def __init__(self, out: Path, step: str) -> None:
        self.path = out / f"{step}.jsonl"
        self.env = environment()
        self.step = step
        out.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"step": self.step, **record, **self.env})
        with self.path.open("a") as f:
            f.write(line + "\n")
        print(json.dumps(record), flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], leaves: list[torch.Tensor]) -> float:
    return time_ms(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=leaves)


def compare(
    sink: Sink, common: dict, ours: Callable, ref: Callable, leaves: list[torch.Tensor], grad
) -> None:
    """Forward and forward+backward records of ``ours`` against ``ref`` (same inputs, same leaves)."""
    out, expected = ours(), ref()
    err = (out.float() - expected.float()).abs().max().item()
    passes = {"fwd": (ours, ref)}
    if leaves:

        def both(fn):
            def run():
                fn().backward(grad)

            return run

        passes["fwd+bwd"] = (both(ours), both(ref))
    for name, (a, b) in passes.items():
        with torch.no_grad() if name == "fwd" else torch.enable_grad():
            ms, ref_ms = _time(a, leaves), _time(b, leaves)
            mem, ref_mem = peak_extra_mib(a), peak_extra_mib(b)
        sink.write({**common, "pass": name, "ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms,
                    "peak_mib": mem, "ref_peak_mib": ref_mem, "max_abs_err_fwd": err})  # fmt: skip


# ----------------------------------------------------------------------------------------- kernels


def _conv_shapes(tiny: bool) -> list[dict]:
    if tiny:
        return [{"name": "tiny", "batch": 1, "channels": 4, "size": (2, 3, 4), "groups": 2}]
    from bench_conv3d import lad_shapes

    # The widest-volume and the widest-channel level of each network: the two ends of the tile space.
    return [s for s in lad_shapes() if s["name"] in ("vqgan.l0", "vqgan.l2", "unet.l0", "unet.l3")]


def bench_conv(sink: Sink, tiny: bool, dtype: torch.dtype) -> None:
    """bench_conv3d's inputs and calls (:func:`bench_conv3d.conv_case`), forward and forward+backward."""
    from bench_conv3d import conv_case

    from lad_fast.kernels import _conv3d_triton

    for shape in _conv_shapes(tiny):
        case = conv_case(shape, dtype, "cuda" if CUDA else "cpu", grad=True)
        common = {"shape": list(case.x.shape), "name": shape["name"], "dtype": dtype_name(dtype)}
        ref = "conv3d(silu(group_norm)) chain"
        compare(sink, {**common, "op": "norm_act_conv3d", "ref": ref},
                case.fused, case.chain_autocast, case.leaves, case.grad)  # fmt: skip
        # The in-load prologue instead of the activation pass (PREACT_MIN_TAPS): measured, not assumed.
        old = _conv3d_triton.PREACT_MIN_TAPS
        _conv3d_triton.PREACT_MIN_TAPS = 1000
        try:
            compare(sink, {**common, "op": "norm_act_conv3d[prologue]", "ref": "the chain"},
                    case.fused, case.chain_autocast, case.leaves, case.grad)  # fmt: skip
        finally:
            _conv3d_triton.PREACT_MIN_TAPS = old
        compare(sink, {**common, "op": "conv3d", "ref": "F.conv3d (cuDNN)"},
                case.conv_triton, case.conv_cudnn, case.leaves[:3], case.grad)  # fmt: skip


def bench_attention(sink: Sink, tiny: bool, dtype: torch.dtype) -> None:
    if tiny:
        shapes = [(1, 2, 24, 16)]
    else:
        from bench_attention import preset_shapes

        shapes = preset_shapes("lad")
    for shape in shapes:
        _bench_attention_shape(sink, shape, dtype)


def _bench_attention_shape(sink: Sink, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lad_fast.kernels import attention

    dev = "cuda" if CUDA else "cpu"
    # SDPA's flash backend takes only fp16 / bf16 on CUDA; elsewhere SDPA picks its own.
    flash = CUDA and dtype != torch.float32
    b, h, seq, d = shape
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, seq, 3, h, d, generator=g).to(dev, dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the U-Net's strided views
    grad = torch.randn(b, h, seq, d, generator=g).to(dev, dtype)

    def sdpa():
        if not flash:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    common = {"op": "attention", "ref": "SDPA flash" if flash else "SDPA", "shape": [b, h, seq, d],
              "dtype": dtype_name(dtype)}  # fmt: skip
    compare(sink, common, lambda: attention(q, k, v, impl="triton"), sdpa, [qkv], grad)


def bench_vq(sink: Sink, tiny: bool) -> None:
    from lad_fast.kernels import vq_nearest

    if tiny:
        n, k, d = 64, 40, 8
    else:
        from bench_vq_nearest import preset_shape

        n, k, d = preset_shape("lad")
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(2)
    z, codebook = torch.randn(n, d, generator=g).to(dev), torch.randn(k, d, generator=g).to(dev)

    def ours():
        return vq_nearest(z, codebook, impl="triton")[0]

    def cdist():
        return torch.cdist(z, codebook).argmin(1)

    agree = (ours() == cdist()).float().mean().item()
    common = {"op": "vq_nearest", "ref": "cdist+argmin", "shape": [n, k, d], "dtype": "float32",
              "index_agreement": agree}  # fmt: skip
    compare(sink, common, lambda: ours().float(), lambda: cdist().float(), [], None)


def step_kernels(out: Path, tiny: bool) -> None:
    sink = Sink(out, "kernels")
    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter computes bf16 wrongly
    bench_vq(sink, tiny)
    bench_attention(sink, tiny, dtype)
    bench_conv(sink, tiny, dtype)


# ------------------------------------------------------------------------------------------- train


def _models(tiny: bool):
    """(name, model, inputs, loss) for the VQ-GAN and the U-Net of the ``lad`` preset (or tiny ones)."""
    from lad_fast.conditioning.conditions import spatial_channels, structure_dim
    from lad_fast.config import ConditionConfig, UNetConfig, VQGANConfig, get_preset
    from lad_fast.models.unet import build_unet
    from lad_fast.models.vqgan import VQGAN

    dev = "cuda" if CUDA else "cpu"
    cfg = get_preset("lad")
    if tiny:
        vq_cfg = VQGANConfig(
            channels=(4, 8), res_blocks=0, groups=4, latent_channels=4, code_dim=4, codebook_size=16
        )
        unet_cfg = UNetConfig(channels=8, multipliers=(1, 2), attention_levels=(1,), heads=2, head_dim=16,
                              groups=4, time_dim=16)  # fmt: skip
        cond = ConditionConfig(content_dim=4, embed_dim=8)
        vol, latent, batch_vq, batch_unet, sdim = (4, 8, 8), (2, 4, 4), 1, 1, 3
    else:
        vq_cfg, unet_cfg, cond = cfg.vqgan, cfg.unet, cfg.condition
        down = 2 ** (len(vq_cfg.channels) - 1)
        vol = cfg.geometry.shape
        latent = tuple(s // down for s in vol)
        batch_vq, batch_unet = cfg.vqgan_train.batch_size, cfg.diffusion_train.batch_size
        sdim = structure_dim(vol[0], cond)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vqgan = VQGAN(vq_cfg)
    x = torch.randn(batch_vq, 1, *vol, generator=g).clamp(-1, 1).to(dev)

    def vq_loss(model, x):
        out = model(x)
        return F.l1_loss(out.recon.float(), x) + out.vq_loss

    unet = build_unet(unet_cfg, cond, vq_cfg.latent_channels, sdim)
    lat = vq_cfg.latent_channels
    z, content, target = (torch.randn(batch_unet, lat, *latent, generator=g).to(dev) for _ in range(3))
    structure = torch.randn(batch_unet, sdim, generator=g).to(dev)
    t = torch.randint(0, 1000, (batch_unet,), generator=g).to(dev)
    k = spatial_channels(cond)
    spatial = torch.rand(batch_unet, k, *latent, generator=g).to(dev) if k else None

    def unet_loss(model, z, t, content, structure, target, spatial):
        extra = () if spatial is None else (spatial,)
        pred = model(z, t, model.embed_condition(content, structure), *extra)
        return F.mse_loss(pred.float(), target)

    return [
        ("vqgan", vqgan, (x,), vq_loss),
        ("unet", unet, (z, t, content, structure, target, spatial), unet_loss),
    ]


def step_train(out: Path, tiny: bool) -> None:
    from lad_fast.models.blocks import set_impl

    sink = Sink(out, "train")
    dev = "cuda" if CUDA else "cpu"
    if not CUDA:
        # The interpreter's cost is per program and per loop step: tall tiles cover a tiny level at once.
        from lad_fast.kernels import _conv3d_bwd_triton, _conv3d_triton

        _conv3d_triton._INTERP_CONV["BLOCK_M"] = 256
        _conv3d_bwd_triton._INTERP_DGRAD["BLOCK_M"] = 256
        _conv3d_bwd_triton._INTERP_WGRAD["BLOCK_M"] = 256
    # bf16 autocast on a GPU, as training runs; fp32 in the interpreter. aot_eager on a CPU: inductor
    # would compile C++ for minutes, while aot_eager traces the same graphs and backward.
    dtype = torch.bfloat16 if CUDA else torch.float32
    backend = "inductor" if CUDA else "aot_eager"
    for name, model0, inputs, loss_fn in _models(tiny):
        for impl in ("torch", "triton"):
            torch._dynamo.reset()
            model = set_impl(copy.deepcopy(model0), impl).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)

            def forward(model, *inputs, loss_fn=loss_fn):
                with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                    return loss_fn(model, *inputs)

            compiled = torch.compile(forward, backend=backend)

            def step(model=model, opt=opt, compiled=compiled, inputs=inputs):
                opt.zero_grad(set_to_none=True)
                loss = compiled(model, *inputs)
                loss.backward()
                opt.step()
                return loss.detach()

            start = time.perf_counter()
            loss = step()
            sync()
            compile_s = time.perf_counter() - start
            times = []
            if CUDA:
                step()  # a second call settles autotuning and allocator pools
                sync()
                torch.cuda.reset_peak_memory_stats()
            else:  # the interpreter takes many seconds per step: the first one is all the dry run times
                times.append(compile_s * 1e3)
            for _ in range(3 if CUDA else 0):
                start = time.perf_counter()
                step()
                sync()
                times.append((time.perf_counter() - start) * 1e3)
            peak = torch.cuda.max_memory_allocated() / 2**20 if CUDA else None
            sink.write({"model": name, "impl": impl, "dtype": dtype_name(dtype),
                        "backend": backend, "tiny": tiny, "first_step_s": compile_s,
                        "step_ms": sorted(times)[len(times) // 2], "peak_mib": peak,
                        "loss": float(loss)})  # fmt: skip
            del model, opt, compiled


# ------------------------------------------------------------------------------------- calibrate


def _this_gpu() -> Any:
    """The lad_fast.utils.gpu_specs entry of this device (its rates time the plan), else memory only."""
    from lad_fast.utils.gpu_specs import GPU, GPUS

    props = torch.cuda.get_device_properties(0)
    name = props.name.lower()
    for key in ("h200", "h100", "l40s", "rtx4090"):
        if key.replace("rtx", "") in name.replace(" ", ""):
            return GPUS[key]
    if "a100" in name:
        return GPUS["a100-80" if props.total_memory > 60 * 2**30 else "a100-40"]
    return GPU(props.name, props.total_memory)


def step_calibrate(out: Path, tiny: bool) -> None:
    """Measured against planned: each model's real training step (the trainer's modules, losses and
    optimiser, built by ``lad_fast.train.plan.build_step``) on this device beside ``lad-fast plan``'s
    prediction of the same step: peak memory and median step time, and their ratios, which are the
    plan's calibration factors. The dry run plans and runs the segmenter's step at ``tiny`` on the CPU
    (no memory measured there, and no time predicted for a CPU)."""
    from lad_fast.config import get_preset
    from lad_fast.train.plan import build_step, plan_step

    sink = Sink(out, "train")  # beside the train step's records: the device tool returns eight files at most
    cfg = get_preset("tiny" if tiny else "lad")
    dev = torch.device("cuda" if CUDA else "cpu")
    gpu = _this_gpu() if CUDA else None
    for model in ("vqgan", "diffusion", "segmenter") if CUDA else ("segmenter",):
        record: dict[str, Any] = {"kind": "calibrate", "model": model, "preset": cfg.preset, "batch": 1}
        record["tiny"] = tiny
        try:
            plan = plan_step(cfg, model, 1, gpu=CUDA)
            at = max(ph.start_step for ph in build_step(cfg, model, 1, gpu=CUDA).phases)
            with dev:  # modules, optimiser state, EMA and the batch on this device, as the trainer puts them
                step = build_step(cfg, model, 1, fake=False, gpu=CUDA)
            step.run(at)  # the first step creates the optimiser state and autotunes
            sync()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(3 if CUDA else 1):
                start = time.perf_counter()
                step.run(at)
                sync()
                times.append((time.perf_counter() - start) * 1e3)
            measured_peak = torch.cuda.max_memory_allocated() if CUDA else None
            planned_s = plan.seconds(gpu) if gpu is not None else None
            step_ms = sorted(times)[len(times) // 2]
            record.update({
                "gpu_spec": gpu.name if gpu is not None else None,
                "planned_peak_mib": plan.peak / 2**20,
                "measured_peak_mib": measured_peak and measured_peak / 2**20,
                "peak_ratio": measured_peak and measured_peak / plan.peak,
                "planned_step_ms": planned_s and planned_s * 1e3,
                "measured_step_ms": step_ms,
                "time_ratio": planned_s and step_ms / (planned_s * 1e3),
            })  # fmt: skip
            del step
        except Exception as err:  # one model's failure must not hide the others' calibration
            record["error"] = f"{type(err).__name__}: {err}"
        sink.write(record)
        if CUDA:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- topology


def step_topology(out: Path, tiny: bool) -> None:
    import numpy as np

    from lad_fast.conditioning.topology import lad_structure_vector

    sink = Sink(out, "topology")
    shape = (4, 16, 16) if tiny else (32, 256, 256)  # the lad geometry
    rng = np.random.default_rng(0)
    # Blobs of classes 1 and 2 with holes: components and tunnels on every slice.
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    mask = np.zeros(shape, dtype=np.uint8)
    for label in (1, 2):
        for _ in range(6):
            c = rng.uniform(-0.7, 0.7, 3)
            r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
            mask[(r < rng.uniform(0.15, 0.35)) & (r > 0.08)] = label
    expected = lad_structure_vector(mask, impl="numpy")
    tensor = torch.from_numpy(mask).to("cuda" if CUDA else "cpu")
    got = lad_structure_vector(tensor, impl="torch")
    numpy_ms = _time(lambda: lad_structure_vector(mask, impl="numpy"), [])
    torch_ms = _time(lambda: lad_structure_vector(tensor, impl="torch"), [])
    sink.write({"op": "lad_structure_vector", "shape": list(shape), "path": "torch " + tensor.device.type,
                "ms": torch_ms, "ref": "numpy (CPU)", "ref_ms": numpy_ms, "speedup": numpy_ms / torch_ms,
                "equal": bool(np.array_equal(got, expected))})  # fmt: skip
    if not np.array_equal(got, expected):
        raise SystemExit("topology: the torch path disagrees with the numpy path")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("env", "kernels", "train", "calibrate", "topology"))
    parser.add_argument("--out", type=Path, required=True, help="folder of the JSON-lines results")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    args = parser.parse_args(argv)
    if not CUDA and not args.tiny:
        print("gpu_suite.py: no CUDA device; the lad shapes need one (use --tiny for the dry run)")
        return 2
    if not CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    if args.step == "env":
        Sink(args.out, "env").write({"tiny": args.tiny})
    else:
        steps = {"kernels": step_kernels, "train": step_train, "calibrate": step_calibrate}
        {**steps, "topology": step_topology}[args.step](args.out, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
