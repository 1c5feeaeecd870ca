"""Helpers shared by test modules (importable through pytest's ``pythonpath = ["tests"]``)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from lad_fast.config import (
    ConditionConfig,
    DiffusionConfig,
    LadConfig,
    SamplingConfig,
    TrainConfig,
    UNetConfig,
    VQGANConfig,
    get_preset,
)


def small_config(diffusion_steps: int = 3) -> LadConfig:
    """The tiny geometry (so the cached tiny phantoms fit) with models shrunk to train in seconds."""
    cfg = get_preset("tiny")
    return replace(
        cfg,
        vqgan=VQGANConfig(channels=(8, 8, 8), groups=4, latent_channels=4, code_dim=4, codebook_size=32),
        vqgan_train=replace(cfg.vqgan_train, steps=2, batch_size=1, checkpoint_every=2),
        unet=UNetConfig(channels=8, multipliers=(1, 2), attention_levels=(1,), heads=1, head_dim=8, groups=4,
                        time_dim=16),
        condition=ConditionConfig(content_dim=8, embed_dim=16),
        diffusion=DiffusionConfig(timesteps=20),
        sampling=SamplingConfig(),  # Lad's DDPM family: ddpm / 50 / guidance 2 unless a test says
        diffusion_train=TrainConfig(steps=diffusion_steps, batch_size=2, lr=1e-3, betas=(0.9, 0.999),
                                    ema_decay=0.9, compile=False, log_every=1, checkpoint_every=2,
                                    preview_every=0),
    )  # fmt: skip


def kill_after_first_checkpoint(proc, model_dir, model: str, timeout_s: float = 60.0) -> int:
    """SIGKILL a training subprocess once ``model_dir`` has a checkpoint; return the step it holds."""
    import signal
    import time
    from pathlib import Path

    from lad_fast.runs.checkpoints import load_checkpoint

    pointer = Path(model_dir) / "latest"
    deadline = time.monotonic() + timeout_s
    while not pointer.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:g} s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return load_checkpoint(Path(model_dir), model).step


def shared_data(path: Path) -> Path:
    """``path`` (the ../shared/data sample data) if it is a folder; otherwise the calling test skips, or,
    under ``CI=true``, fails: the README cites the tests that read it as evidence, so CI must run them."""
    import pytest

    if Path(path).is_dir():
        return Path(path)
    missing = f"{path} is not beside this checkout"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{missing}; under CI=true the tests that read the shared sample data must run")
    pytest.skip(missing)


def rewrite_meta(meta_path: Path, meta: dict) -> None:
    """Write an edited checkpoint ``meta.json`` and seal it into the step's ``digest`` again, as if
    lad-fast had written it so: for tests of the checks that come after the digest (another model, an
    organ vocabulary, a malformed file list ...)."""
    import hashlib
    import json

    meta_path.write_text(json.dumps(meta))
    digest = meta_path.with_name("digest")
    entries = dict(reversed(line.split("  ", 1)) for line in digest.read_text().splitlines())
    entries["meta.json"] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    digest.write_text("".join(f"{sha}  {name}\n" for name, sha in sorted(entries.items())))


class TruthPredictions:
    """Stands in for ``predict_volumes(net, images, device)`` in :mod:`lad_fast.train.segmenter`: returns
    the true labels of whichever window of the known ``columns`` it is shown, so a test of what is done
    with predictions does not hang on what a segmenter trained for two steps happens to predict.

    ``columns``: (image (D', H, W) in [-1, 1], labels (D', H, W)) pairs; a prepared case is a column of
    one window. Edit a column's labels to stand for a segmenter that misses an organ there.
    """

    def __init__(self, columns):
        import numpy as np

        self.columns = [(np.asarray(unit), np.asarray(labels, dtype=np.uint8)) for unit, labels in columns]

    def __call__(self, net, images, device):
        import numpy as np

        depth, out = np.shape(images)[1], []
        for volume in np.asarray(images):
            found = (
                labels[s : s + depth]
                for unit, labels in self.columns
                for s in range(len(unit) - depth + 1)
                if np.array_equal(unit[s : s + depth], volume)
            )
            window = next(found, None)
            assert window is not None, "shown an image that is no window of a known column"
            out.append(window)
        return np.stack(out)
