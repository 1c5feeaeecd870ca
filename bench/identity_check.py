"""Before/after check for refactors: the main job at a few steps, then generate, hashed.

Runs ``lad-fast train --steps N`` on the built-in phantoms into a fresh run folder and
``lad-fast generate`` from it, then prints (and writes with ``--out``) the SHA-256 of every
weight file of the latest checkpoints and of every generated volume and mask. Run it on the
commit before a refactor and on the commit after it: equal hashes mean bit-identical weights and
volumes for the same seed. Not a test (it trains for a minute or two on two CPU cores).

    python bench/identity_check.py --workdir /tmp/identity --out bench/results/identity_after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    run, gen = args.workdir / "run", args.workdir / "generated"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    lad = [sys.executable, "-m", "lad_fast.cli.app"]
    subprocess.run([*lad, "train", "--run", str(run), "--steps", str(args.steps)], check=True, env=env)
    subprocess.run(
        [
            *lad,
            "generate",
            "--run",
            str(run),
            "--out",
            str(gen),
            "--n",
            "3",
            "--batch",
            "2",
            "--sampler",
            "euler",
            "--steps",
            "8",
            "--seed",
            "5",
        ],
        check=True,
        env=env,
    )
    import nibabel as nib
    import numpy as np

    hashes: dict[str, str] = {}
    for model in ("vqgan", "diffusion", "segmenter"):
        pointer = run / model / "latest"
        if not pointer.is_file():
            continue
        step_dir = run / model / pointer.read_text().strip()
        for f in sorted(step_dir.glob("*.safetensors")):
            hashes[f"{model}/{f.name}"] = _sha(f)
    for sub in ("images", "masks"):
        for f in sorted((gen / sub).glob("*.nii.gz")):
            img = nib.load(f)  # the voxels and the affine: gzip headers may carry a time stamp
            blob = np.asarray(img.dataobj).tobytes() + np.asarray(img.affine).tobytes()
            hashes[f"{sub}/{f.name}"] = hashlib.sha256(blob).hexdigest()
    import torch

    record = {
        "steps": args.steps,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "hashes": hashes,
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
