"""Sampler throughput: seconds per volume split into denoiser, decode and write, per backend, side by side.

A speed bench on **untrained** networks of the preset's sizes (random weights, so the volumes are noise:
the time of a forward pass does not depend on what the weights learnt). Rows:

- one per backend this machine has (torch eager, torch.compile, ONNX Runtime as lad-fast runs it and
  with the thread policy's thread count and no spinning, TensorRT) with the preset's default sampler
  (``tiny`` and ``lad``: Euler, 30 steps, guidance 3, conditional and null branch in one batch);
- the **baseline**: Lad's official configuration on the same network: ancestral DDPM over T = 300 steps,
  eager fp32, batch 1, the conditional and null branch as two separate forward passes (the official code
  computes both and mixes them with s = 1). ``--baseline-steps k`` times k steps and scales to 300
  (recorded as ``extrapolated_from_steps``), for ``lad`` on a CPU.

Decode (quantise + VQ-GAN decode, one volume at a time, eager) and write (HU conversion, image and mask
NIfTI, gzip) are the same code for every backend, so they are measured once and shown in every row.
``vol/min`` is serial (denoise + decode + write); ``vol/min pipelined`` is the bound of the pipelined
generator, 60 / max(denoise, decode + write), reached when a free core (or the GPU) takes the writer.
``speedup_vs_baseline`` is the baseline's seconds per volume over the row's; ``denoiser_speed_vs_eager``
(ONNX rows) is eager's denoiser seconds over the row's (> 1: faster than eager).

    python bench/bench_sampler.py --preset tiny [--backends torch,onnx] [--n 4] [--note "..."]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ALL_BACKENDS = ("torch", "compile", "onnx", "onnx-tuned", "trt")


def _networks(preset: str, device: torch.device):
    from lad_fast.conditioning.conditions import structure_dim
    from lad_fast.config import get_preset
    from lad_fast.models.unet import build_unet
    from lad_fast.models.vqgan import VQGAN

    cfg = get_preset(preset)
    torch.manual_seed(0)
    vq = VQGAN(cfg.vqgan).eval().to(device)
    f = vq.downsample_factor
    shape = (cfg.vqgan.latent_channels, *(s // f for s in cfg.geometry.shape))
    length = structure_dim(cfg.geometry.shape[0], cfg.condition)  # Betti numbers per axial slice
    net = build_unet(cfg.unet, cfg.condition, cfg.vqgan.latent_channels, length)
    return cfg, vq, net.eval().to(device), shape


def _conditions(net, shape, n: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    content = torch.randn(n, *shape, generator=g).to(device)
    structure = torch.rand(n, net.structure_dim, generator=g).to(device)
    ch = getattr(net, "spatial_channels", 0)
    spatial = torch.rand(n, ch, *shape[1:], generator=g).to(device) if ch else None
    return {"content": content, "structure": structure, "spatial": spatial}


def _example(net, shape, device, t_dtype) -> tuple[list[torch.Tensor], list[str]]:
    ex = [
        torch.zeros(1, *shape, device=device),
        torch.zeros(1, dtype=t_dtype, device=device),
        torch.zeros(1, net.cond_cfg.embed_dim, device=device),
    ]
    names = ["x", "t", "cond"]
    if getattr(net, "spatial_channels", 0):
        ex.append(torch.zeros(1, net.spatial_channels, *shape[1:], device=device))
        names.append("spatial")
    return ex, names


def _denoiser(backend: str, net, example, names, cache: Path):
    """(callable, setup seconds, note) for a backend; raises RuntimeError with the reason it is absent."""
    from lad_fast.export.backends import make_denoiser

    t = time.perf_counter()
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise RuntimeError("TensorRT not installed") from None
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU")
    if backend == "onnx-tuned":
        import onnxruntime as ort

        den = make_denoiser("onnx", net, example, names, cache)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = next(cache.glob("denoiser-*.onnx"))
        den.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        note = f"ONNX Runtime, {torch.get_num_threads()} intra-op thread(s), no spinning"
    else:
        den = make_denoiser(backend, net, example, names, cache)
        note = {"torch": "eager", "compile": "torch.compile", "onnx": "ONNX Runtime defaults", "trt": "fp16"}[
            backend
        ]
    return den, time.perf_counter() - t, note


def _time_sampling(fn, n: int, batch: int) -> float:
    """Seconds per volume of ``fn(start, size)`` over n volumes in batches (after one warm-up batch)."""
    fn(0, min(batch, n))
    t = time.perf_counter()
    for start in range(0, n, batch):
        fn(start, min(batch, n - start))
    return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "lad"])
    p.add_argument(
        "--backends", default=",".join(ALL_BACKENDS), help="comma list of " + ", ".join(ALL_BACKENDS)
    )
    p.add_argument("--n", type=int, default=4, help="volumes timed per row")
    p.add_argument("--batch", type=int, default=1, help="volumes per sampler call")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's)")
    p.add_argument("--baseline-steps", type=int, default=300, help="DDPM steps timed for the baseline")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--note", default="", help="recorded with the result (e.g. the machine was shared)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    from lad_fast.config import DiffusionConfig
    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.data.io import write_nifti
    from lad_fast.diffusion.samplers import sample_ddpm
    from lad_fast.diffusion.schedules import make_schedule
    from lad_fast.generate.generate import SamplerSettings, sample_latents
    from lad_fast.utils.threads import apply_thread_policy

    threads = apply_thread_policy()
    device = torch.device(args.device)
    cfg, vq, net, shape = _networks(args.preset, device)
    sched = make_schedule(cfg.diffusion)
    s = cfg.sampling
    settings = SamplerSettings(s.sampler, args.steps or s.steps, s.guidance, None)
    t_dtype = torch.float32 if sched.objective == "flow" else torch.long
    example, names = _example(net, shape, device, t_dtype)
    conds = _conditions(net, shape, max(args.n, args.batch), device)

    def run(den, start: int, size: int) -> torch.Tensor:
        sl = slice(start, start + size)
        sp = conds["spatial"]
        return sample_latents(
            net, den, conds["content"][sl], conds["structure"][sl], list(range(start, start + size)),
            settings, spatial=None if sp is None else sp[sl], sched=sched,
            prediction=cfg.diffusion.prediction, shape=shape, device=device,
        )  # fmt: skip

    # decode and write: the same for every backend, measured once
    x0 = run(lambda *a: net(*a), 0, 1)
    mask = np.zeros(cfg.geometry.shape, dtype=np.uint8)
    affine = np.diag([*cfg.geometry.spacing, 1.0])

    @torch.no_grad()
    def decode() -> np.ndarray:
        latent = vq.quantize(vq.from_unit(x0.clamp(-1, 1)))
        return vq.decode(latent)[0, 0].float().cpu().numpy()

    image = decode()
    t = time.perf_counter()
    for _ in range(args.n):
        image = decode()
    decode_s = (time.perf_counter() - t) / args.n
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for k in range(args.n):
            write_nifti(
                Path(tmp) / f"i{k}.nii.gz", unit_to_hu(image, cfg.geometry.hu_window), affine, "image"
            )
            write_nifti(Path(tmp) / f"m{k}.nii.gz", mask, affine, "labels")
        write_s = (time.perf_counter() - t) / args.n

    rows: list[dict[str, Any]] = []

    def row(name: str, denoise_s: float, **extra: Any) -> None:
        serial = denoise_s + decode_s + write_s
        rows.append({
            "backend": name, "denoise_s": round(denoise_s, 4), "decode_s": round(decode_s, 4),
            "write_s": round(write_s, 4), "s_per_volume": round(serial, 4),
            "vol_per_min": round(60 / serial, 2),
            "vol_per_min_pipelined": round(60 / max(denoise_s, decode_s + write_s), 2), **extra,
        })  # fmt: skip

    with tempfile.TemporaryDirectory() as cache:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if backend not in ALL_BACKENDS:
                p.error(f"unknown backend {backend!r}; choose from {', '.join(ALL_BACKENDS)}")
            try:
                den, setup_s, note = _denoiser(backend, net, example, names, Path(cache))
            except Exception as err:  # noqa: BLE001 - a missing backend is a row that says why
                rows.append({"backend": backend, "skipped": f"{type(err).__name__}: {err}"[:200]})
                continue
            den_s = _time_sampling(lambda a, b, den=den: run(den, a, b), args.n, args.batch)
            sampler = f"{settings.sampler} {settings.steps} steps, guidance {settings.guidance} (batched)"
            row(backend, den_s, setup_s=round(setup_s, 2), batch=args.batch, note=note, sampler=sampler)

    if not args.no_baseline:
        # Lad's official configuration: DDPM T=300 (cosine, eps), both branches as separate forwards
        ddpm = make_schedule(DiffusionConfig())
        one = {k: (None if v is None else v[:1]) for k, v in conds.items()}
        with torch.no_grad():
            emb = net.embed_condition(one["content"], one["structure"])
            null = net.null_condition(1).to(emb.dtype)
        extra = [] if one["spatial"] is None else [one["spatial"]]
        extra_null = [] if one["spatial"] is None else [torch.zeros_like(one["spatial"])]
        steps_done = 0

        @torch.no_grad()
        def official(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal steps_done
            steps_done += 1
            if steps_done > args.baseline_steps:
                raise StopIteration
            cond = net(x, t, emb, *extra)
            unc = net(x, t, null, *extra_null)
            return unc + 1.0 * (cond - unc)

        gens = [torch.Generator().manual_seed(0)]
        official(
            torch.zeros(1, *shape, device=device), torch.zeros(1, dtype=torch.long, device=device)
        )  # warm-up
        steps_done = 0
        t = time.perf_counter()
        try:
            sample_ddpm(official, ddpm, shape, gens, prediction="eps", device=device)
        except StopIteration:
            pass
        elapsed = time.perf_counter() - t
        per_step = elapsed / min(steps_done, args.baseline_steps)
        row("baseline (official)", per_step * ddpm.T, batch=1,
            note="ancestral DDPM, eager fp32, batch 1, cond and null as two forwards",
            sampler=f"ddpm {ddpm.T} steps", **({"extrapolated_from_steps": args.baseline_steps}
                                                  if args.baseline_steps < ddpm.T else {}))  # fmt: skip
        base = rows[-1]["s_per_volume"]
        for r in rows:
            if "s_per_volume" in r:
                r["speedup_vs_baseline"] = round(base / r["s_per_volume"], 1)
    eager = next((r for r in rows if r.get("backend") == "torch" and "denoise_s" in r), None)
    for r in rows:
        if eager and "denoise_s" in r and r["backend"].startswith("onnx"):
            r["denoiser_speed_vs_eager"] = round(eager["denoise_s"] / r["denoise_s"], 2)

    print(f"bench sampler, preset {args.preset}, {device}, {threads} torch thread(s); UNTRAINED networks "
          "(a speed bench: the volumes are noise)")  # fmt: skip
    cols = ("denoise s", 10), ("decode s", 9), ("write s", 8), ("s/vol", 8), ("vol/min", 8), ("pipelined", 9)
    print(f"{'backend':22} " + " ".join(f"{c:>{w}}" for c, w in cols))
    for r in rows:
        if "skipped" in r:
            print(f"{r['backend']:22} skipped: {r['skipped']}")
        else:
            keys = (
                "denoise_s",
                "decode_s",
                "write_s",
                "s_per_volume",
                "vol_per_min",
                "vol_per_min_pipelined",
            )
            print(
                f"{r['backend']:22} "
                + " ".join(f"{r[k]:>{w}.3f}" for k, (_, w) in zip(keys, cols, strict=True))
            )
    if args.no_write:
        return 0
    import onnxruntime

    record = {
        "bench": "sampler",
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "cores_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },  # fmt: skip
        "networks": "untrained (random weights) of the preset's sizes: a speed bench",
        "n_volumes": args.n,
        "note": args.note,
        "rows": rows,
    }
    from _common import append_result  # the sibling helper every bench script appends through

    print(f"appended to {append_result('sampler', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
