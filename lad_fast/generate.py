"""``lad-fast generate``: large synthetic datasets from a trained run (Lad phase 3).

For volume ``i`` of ``n``: source mask ``i % S`` of the S source masks, variant ``(i // S) % augment`` of
its augmentations (``lad_fast.augment``: result k of ``augment_many(mask, ..., seed_s, K)``), conditions
recomputed from that augmented mask, a latent sampled with classifier-free guidance from the generator of
:func:`volume_seed` ``(seed, i)``, quantised and decoded by the VQ-GAN. Conditions and decoding run one
volume at a time and sampling noise comes from one generator per volume, so a volume does not depend on
the batch it was drawn in (the batched U-Net forward is the only thing that sees the batch).

Output (DESIGN.md "Generated datasets")::

    out/images/<id>.nii.gz     int16 HU on the source case's prepared grid (preset spacing)
    out/masks/<id>.nii.gz      uint8 canonical ids: the augmented mask whose conditions made the image
    out/manifest.jsonl         one JSON line per volume (written after both files)
    out/dataset.json           nnU-Net / MONAI description (channel_names, labels, training list)

Volume files are written atomically and its manifest line appended afterwards, so a volume is complete
when its line exists; a rerun with the same settings skips complete volumes. Under ``torchrun`` rank r
makes the ids ``i % world == r`` and appends to ``manifest.rank<r>.jsonl``; rank 0 merges the shards
after a barrier.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad_fast.errors import CheckpointError, ConfigError, InputError, LadFastError, OutputExistsError

IMAGES, MASKS = "images", "masks"
MANIFEST = "manifest.jsonl"
DATASET_JSON = "dataset.json"
_SHARD_RE = re.compile(r"^manifest\.rank\d+\.jsonl$")
# Settings that make two volumes with the same id the same volume; a rerun must match them to resume.
IDENTITY = ("base_seed", "sampler", "steps", "guidance", "augment", "source_dataset", "diffusion_checkpoint")


def volume_id(i: int) -> str:
    """File stem of volume ``i`` (fixed width, so ids sort like indices and do not depend on n)."""
    return f"lad_{i:06d}"


def _derive(*parts: object) -> int:
    """A 63-bit seed from its parts (blake2b), independent of process, batch and rank."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def volume_seed(seed: int, i: int) -> int:
    """Seed of volume ``i``'s sampling noise: a function of (seed, i) only."""
    return _derive("volume", seed, i)


# ------------------------------------------------------------------------------------- source masks


@dataclass(frozen=True)
class SourceMask:
    """One source mask on the preset grid: (D, H, W) canonical ids and the grid's (4, 4) affine."""

    case: str
    mask: np.ndarray
    affine: np.ndarray


def load_source_masks(path: Path, preset: str, shape: tuple[int, int, int]) -> list[SourceMask]:
    """Masks of a prepared dataset (cases with a mask), or of a folder of NIfTI label maps with canonical
    ids already on the preset grid (the ``masks/`` folder of a generated dataset, for instance)."""
    from lad_fast.data.prepared import INDEX, PreparedDataset

    path = Path(path)
    if (path / INDEX).is_file():
        ds = PreparedDataset(path, expect_preset=preset)
        out = []
        for i, case in enumerate(ds.case_ids):
            if ds.entry(case)["has_mask"]:
                item = ds[i]
                out.append(SourceMask(case, np.asarray(item["mask"]), item["affine"]))
        if not out:
            raise InputError(f"{path}: no case has a mask; generation is conditioned on masks")
        return out
    if not path.is_dir():
        raise InputError(f"{path}: no such folder; pass a prepared dataset or a folder of NIfTI masks")
    import nibabel as nib

    from lad_fast.data.geometry import nifti_to_dhw
    from lad_fast.data.io import is_nifti, nifti_stem

    files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        raise InputError(f"{path}: neither a prepared dataset (no {INDEX}) nor a folder of NIfTI masks")
    out = []
    for f in files:
        img = nib.load(str(f))
        mask, affine = nifti_to_dhw(np.asarray(img.dataobj), img.affine)
        if mask.shape != tuple(shape) or mask.dtype.kind not in "iu":
            raise InputError(
                f"{f}: a {mask.dtype} mask of shape {mask.shape} is not on the {preset!r} grid "
                f"{tuple(shape)}; prepare it with `lad-fast prepare` and pass the prepared folder"
            )
        out.append(SourceMask(nifti_stem(f), mask, affine))
    return out


def augmented_mask(
    src: SourceMask, index: int, variant: int | None, seed: int, cfg: Any
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Variant ``variant`` of source ``index`` (None: the source mask itself) and its record.

    Equal to result ``variant`` of ``augment_many(src.mask, spacing, cfg.augment, seed_s, K)`` for any K
    (that function seeds result k with ``default_rng([seed_s, k])``); only the asked-for one is computed.
    """
    from lad_fast.augment import augment_mask

    if variant is None:
        return src.mask, None
    seed_s = _derive("augment", seed, index) & 0xFFFFFFFF
    mask, record = augment_mask(
        src.mask, cfg.geometry.spacing, cfg.augment, np.random.default_rng([seed_s, variant])
    )
    return mask, {"seed": seed_s, "index": variant, **record}


# ------------------------------------------------------------------------------------- output folder


def _is_ours(name: str) -> bool:
    return (
        name in (IMAGES, MASKS, MANIFEST, DATASET_JSON) or bool(_SHARD_RE.match(name)) or name.startswith(".")
    )


def _read_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill mid-append: its volume is made again
    return out


def read_manifest(out: Path) -> dict[int, dict[str, Any]]:
    """Manifest lines by volume index (merged manifest and rank shards; the last line of an id wins)."""
    lines = _read_lines(out / MANIFEST)
    for shard in sorted(p for p in out.glob("manifest.rank*.jsonl") if _SHARD_RE.match(p.name)):
        lines += _read_lines(shard)
    return {int(r["index"]): r for r in lines if isinstance(r, dict) and "index" in r}


def _drop_torn_line(path: Path) -> None:
    """Cut a last line left without its newline by a kill mid-append, so the next line starts clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _complete(out: Path, rec: dict[str, Any]) -> bool:
    vid = rec.get("id", "")
    return (out / IMAGES / f"{vid}.nii.gz").is_file() and (out / MASKS / f"{vid}.nii.gz").is_file()


def _check_out(out: Path, settings: dict[str, Any], force: bool) -> None:
    """Refuse foreign files and volumes made with other settings (unless ``force``: then ours are deleted)."""
    import shutil

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another --out")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{out}: folder holds files generate did not write ({shown}); choose an empty or new --out, "
            "or pass --force to write into it anyway"
        )
    old = read_manifest(out)
    other = next((r for r in old.values() if any(r.get(k) != settings[k] for k in IDENTITY)), None)
    if other is None:
        return
    if not force:
        diff = [f"{k}: {other.get(k)!r} -> {settings[k]!r}" for k in IDENTITY if other.get(k) != settings[k]]
        raise OutputExistsError(
            f"{out}: holds volumes generated with other settings ({'; '.join(diff)}); rerun with the same "
            "settings to complete them, choose a new --out, or pass --force to replace them"
        )
    for name in (IMAGES, MASKS):
        shutil.rmtree(out / name, ignore_errors=True)
    for p in out.iterdir():
        if p.name in (MANIFEST, DATASET_JSON) or _SHARD_RE.match(p.name):
            p.unlink()


def dataset_json(records: Sequence[dict[str, Any]], description: str) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json`` fields plus the MSD-style ``training`` list MONAI's
    ``load_decathlon_datalist`` reads (paths relative to the dataset folder)."""
    from lad_fast.data.labels import CANONICAL_ORGANS

    return {
        "name": "lad-fast-generated",
        "description": description,
        "tensorImageSize": "3D",
        "channel_names": {"0": "CT"},
        "modality": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(CANONICAL_ORGANS)},
        "numTraining": len(records),
        "file_ending": ".nii.gz",
        "training": [
            {"image": f"./{IMAGES}/{r['id']}.nii.gz", "label": f"./{MASKS}/{r['id']}.nii.gz"} for r in records
        ],
    }


def finalize(out: Path, description: str = "synthetic abdominal CT generated by lad-fast") -> int:
    """Merge manifest shards into ``manifest.jsonl`` (one line per complete volume, by index), delete the
    shards, write ``dataset.json``; returns the number of complete volumes."""
    from lad_fast.atomic import write_json, write_text

    records = [r for _, r in sorted(read_manifest(out).items()) if _complete(out, r)]
    write_text(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in records))
    for shard in out.glob("manifest.rank*.jsonl"):
        if _SHARD_RE.match(shard.name):
            shard.unlink()
    write_json(out / DATASET_JSON, dataset_json(records, description))
    return len(records)


# ------------------------------------------------------------------------------------- generation


def _check_args(n: int, sampler: str, guidance: float, augment: int, batch: int, backend: str) -> None:
    from lad_fast.export.backends import BACKENDS
    from lad_fast.samplers import SAMPLERS

    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if guidance < 0:
        raise ConfigError(f"--guidance must be >= 0 (0: unconditional, 1: conditional), got {guidance}")
    if augment < 0:
        raise ConfigError(f"--augment must be >= 0 (0: the source masks as they are), got {augment}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            from lad_fast.errors import BackendUnavailableError
            from lad_fast.export.tensorrt import _INSTALL_HINT

            raise BackendUnavailableError(f"--backend trt: {_INSTALL_HINT}") from None


def _write_volume(
    out: Path, vid: str, hu: np.ndarray, mask: np.ndarray, affine: np.ndarray, manifest: Path, record: dict
) -> None:
    """Image and mask atomically, then the manifest line; on failure nothing of this volume stays."""
    from lad_fast.atomic import append_line
    from lad_fast.data.geometry import dhw_to_nifti
    from lad_fast.data.io import write_nifti

    paths = [out / IMAGES / f"{vid}.nii.gz", out / MASKS / f"{vid}.nii.gz"]
    try:
        write_nifti(paths[0], *dhw_to_nifti(hu, affine), kind="image")
        write_nifti(paths[1], *dhw_to_nifti(mask, affine), kind="labels")
        append_line(manifest, json.dumps(record))
    except OSError as err:
        for p in paths:
            p.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise LadFastError(
                f"{out}: no space left on device while writing volume {vid}; free some space and rerun "
                "the same command: complete volumes are kept and the rest is generated"
            ) from err
        raise LadFastError(f"{out}: cannot write volume {vid} ({err}); check the folder and rerun") from err


def generate(
    run: Path,
    out: Path,
    n: int,
    sampler: str = "ddpm",
    steps: int = 50,
    guidance: float = 2.0,
    eta: float = 0.0,
    masks: Path | None = None,
    augment: int = 4,
    batch: int = 4,
    seed: int = 0,
    backend: str = "torch",
    force: bool = False,
    device: str = "auto",
) -> Path:
    """Generate ``n`` volumes with paired masks from the trained ``run`` into ``out``; returns ``out``.

    sampler: "ddpm" (all T steps, ``steps`` ignored; the official Lad sampler and the default), "ddim"
    (``eta`` 0 deterministic, 1 stochastic) or "dpmpp2m" with ``steps`` <= T. The deterministic samplers
    need a well-trained denoiser: at the tiny preset's short budget they drift (see README).
    guidance: classifier-free guidance scale (0 unconditional, 1 conditional). masks: a prepared dataset
    or a folder of NIfTI masks on the preset grid (default: the data the diffusion model trained on).
    augment: augmented variants per source mask (0: the masks as they are). batch: volumes per sampler
    call. backend: "torch", "compile", "onnx" or "trt" (see ``lad_fast.export.backends``).
    """
    from lad_fast.data.geometry import unit_to_hu
    from lad_fast.devices import resolve_device
    from lad_fast.diffusion import make_schedule
    from lad_fast.distributed import init_distributed
    from lad_fast.export.backends import make_denoiser
    from lad_fast.progress import make_progress
    from lad_fast.runs import RunDir
    from lad_fast.samplers import guided_denoiser, sample
    from lad_fast.trained import (
        checkpoint_hash,
        clip_bounds,
        denormalize_latents,
        encode_case,
        load_diffusion,
        load_frozen_vqgan,
    )

    run, out = Path(run), Path(out)
    _check_args(n, sampler, guidance, augment, batch, backend)
    dev = resolve_device(device)
    info = init_distributed(dev)
    if dev.type == "cuda" and info.enabled:
        dev = torch.device("cuda", info.local_rank)

    net, meta = load_diffusion(run, dev)
    cfg = RunDir.open(run).config()
    sched = make_schedule(meta["diffusion_config"])
    prediction = meta["diffusion_config"].prediction
    if sampler == "ddpm":
        steps = sched.T  # ancestral DDPM always walks every timestep
    elif not 1 <= steps <= sched.T:
        raise ConfigError(f"--steps {steps} is outside 1..{sched.T} (the model's T); use at most {sched.T}")
    vqgan_run = Path(meta.get("vqgan_run") or run)
    vq, _ = load_frozen_vqgan(vqgan_run, cfg, dev)
    vq_hash = checkpoint_hash(vqgan_run / "vqgan")
    if meta.get("vqgan_hash") not in (None, vq_hash):
        raise CheckpointError(
            f"the VQ-GAN in {vqgan_run} changed after the diffusion model of {run} was trained on its "
            "latents; retrain the diffusion model (lad-fast train diffusion --force) or restore that VQ-GAN"
        )
    source_path = Path(masks) if masks is not None else Path(meta.get("data") or "")
    if not str(source_path) or not source_path.exists():
        raise InputError(
            f"{source_path or 'the run'}: the masks to condition on are not there; pass --masks PREPARED|DIR"
        )
    sources = load_source_masks(source_path, cfg.preset, cfg.geometry.shape)

    settings = {
        "base_seed": seed,
        "sampler": sampler,
        "steps": steps,
        "eta": float(eta),
        "guidance": float(guidance),
        "augment": augment,
        "source_dataset": str(source_path.resolve()),
        "diffusion_checkpoint": meta["checkpoint_hash"],
    }
    if info.is_main:
        _check_out(out, settings, force)
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        (out / MASKS).mkdir(parents=True, exist_ok=True)
    if info.enabled:
        torch.distributed.barrier()
    done = read_manifest(out)
    todo = [
        i for i in range(n) if i % info.world == info.rank and not (i in done and _complete(out, done[i]))
    ]
    manifest = out / (MANIFEST if not info.enabled else f"manifest.rank{info.rank}.jsonl")
    _drop_torn_line(manifest)

    shape = tuple(int(s) for s in meta["latent_shape"])
    example = (torch.zeros(1, *shape, device=dev), torch.zeros(1, dtype=torch.long, device=dev),
               torch.zeros(1, net.cond_cfg.embed_dim, device=dev))  # fmt: skip
    denoise = make_denoiser(backend, net, example, ("x", "t", "cond"), run / "diffusion" / "export")
    window = cfg.geometry.hu_window
    t0 = time.perf_counter()
    made = 0
    with make_progress() as progress:
        task = progress.add_task("generate", total=len(todo), status="") if info.is_main else None
        for start in range(0, len(todo), batch):
            ids = todo[start : start + batch]
            jobs = []
            for i in ids:
                s = i % len(sources)
                variant = (i // len(sources)) % augment if augment else None
                mask, record = augmented_mask(sources[s], s, variant, seed, cfg)
                jobs.append((i, sources[s], mask, record, encode_case(vq, None, mask, cfg, dev)))
            with torch.no_grad():
                content = torch.stack([j[4]["content"] for j in jobs]).to(dev)
                structure = torch.stack([j[4]["structure"] for j in jobs]).to(dev)
                # one sample at a time: the embedding must not depend on the batch either
                emb = torch.cat(
                    [net.embed_condition(content[k : k + 1], structure[k : k + 1]) for k in range(len(ids))]
                )
                null = net.null_condition(len(ids)).to(emb.dtype)
                den = guided_denoiser(denoise, [emb], [null], guidance)
                gens = [torch.Generator().manual_seed(volume_seed(seed, i)) for i in ids]
                x0 = sample(
                    sampler,
                    den,
                    sched,
                    shape,
                    gens,
                    prediction=prediction,
                    steps=steps,
                    eta=eta,
                    device=dev,
                    clip=clip_bounds(meta.get("latent_norm"), torch.zeros(1, *shape, device=dev)),
                )
                x0 = denormalize_latents(x0, meta.get("latent_norm"))
                for k, (i, src, mask, record, _) in enumerate(jobs):
                    latent = vq.quantize(vq.from_unit(x0[k : k + 1].clamp(-1, 1).float()))
                    image = vq.decode(latent)[0, 0].float().cpu().numpy()
                    line = {
                        "id": volume_id(i),
                        "index": i,
                        "seed": volume_seed(seed, i),
                        "source_case": src.case,
                        "augmentation": record,
                        **settings,
                        "backend": backend,
                        "vqgan_checkpoint": vq_hash,
                        "run": str(run.resolve()),
                        "rank": info.rank,
                    }
                    _write_volume(
                        out, volume_id(i), unit_to_hu(image, window), mask, src.affine, manifest, line
                    )
                    made += 1
            if task is not None:
                rate = made / max(time.perf_counter() - t0, 1e-9) * 60
                progress.update(task, completed=made, status=f"{rate:.1f} vol/min")
    if info.enabled:
        torch.distributed.barrier()  # every shard is written before rank 0 merges them
    if info.is_main:
        finalize(out)
    if info.enabled:
        torch.distributed.barrier()
    return out
