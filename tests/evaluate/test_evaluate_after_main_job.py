"""``lad-fast evaluate`` right after the README's main job (no segmenter trained), and the warning for a
segmenter too weak to score masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lad_fast.cli.app import main


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    from lad_fast.data.cache import phantom_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        return phantom_dataset("tiny", n=4, seed=5)


@pytest.mark.slow
def test_the_readme_evaluate_block_runs_after_the_main_job(real, tmp_path, capsys):
    """Main job (every stage, 1 step each, labelled data: no segmenter), generate --n 2, then evaluate as
    written: image metrics from the VQ-GAN's features, mask metrics skipped in one line naming the
    command that adds them."""
    run, gen, out = tmp_path / "run", tmp_path / "generated", tmp_path / "eval.json"
    cpu = ["--device", "cpu"]
    code, _, err = _cli(["train", "--data", str(real), "--run", str(run), "--steps", "1", *cpu], capsys)
    assert code == 0, err
    assert not (run / "segmenter").exists()  # labelled data: the main job trains no segmenter
    code, _, err = _cli(
        ["generate", "--run", str(run), "--n", "2", "--out", str(gen), "--steps", "2", *cpu], capsys
    )
    assert code == 0, err
    code, stdout, err = _cli(
        ["evaluate", "--real", str(real), "--synthetic", str(gen), "--out", str(out),
         "--png", str(tmp_path / "e.png"), *cpu],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["features"]["extractor"] == "vqgan" and report["segmenter"] is None
    assert report["realism"]["fid"] is not None and report["references"]["trivial"]["fid"] is not None
    note = (
        f"mask fidelity skipped: {run.resolve()} holds no segmenter (the main job trains one only for "
        "unlabelled cases); add Dice, shuffled baseline and real ceiling with "
        f"`lad-fast train segmenter --run {run.resolve()}` and evaluate again"
    )
    assert report["fidelity"]["skipped"] == note
    assert "dice" not in json.dumps(report["fidelity"])
    assert "mask fidelity skipped:" in stdout and "lad-fast train segmenter --run" in stdout
    # an explicitly asked segmenter is still required
    code, _, err = _cli(
        ["evaluate", "--real", str(real), "--synthetic", str(gen), "--features", "segmenter", *cpu], capsys
    )
    assert code == 2 and "holds no segmenter; train one with `lad-fast train segmenter" in err


def test_vqgan_features_pool_every_encoder_block_and_the_latents():
    from lad_fast.config import get_preset
    from lad_fast.evaluate.features import make_extractor
    from lad_fast.models.vqgan import VQGAN

    torch.manual_seed(0)
    vq = VQGAN(get_preset("tiny").vqgan).eval()
    x = torch.rand(3, 1, 16, 32, 32) * 2 - 1
    feats = make_extractor("vqgan", vqgan=vq)(x)
    with torch.no_grad():
        h = vq.encoder.conv_in(x)
        pooled = []
        for block in vq.encoder.blocks:
            h = block(h)
            pooled.append(h.mean(dim=(2, 3, 4)))
        z = vq.encode_pre_quant(x)
    ref = torch.cat([*pooled, z.mean(dim=(2, 3, 4)), z.flatten(2).std(dim=2, unbiased=False)], dim=1)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    assert not vq.encoder.blocks[0]._forward_hooks  # the hooks are removed


def test_vqgan_features_without_a_vqgan_are_refused():
    from lad_fast.errors import ConfigError
    from lad_fast.evaluate.features import make_extractor

    with pytest.raises(ConfigError, match="needs the VQ-GAN of the run that generated the volumes"):
        make_extractor("vqgan")


def test_a_real_ceiling_under_the_minimum_names_the_segmenter_too_weak():
    from lad_fast.evaluate.fidelity import CEILING_MIN_DICE, ceiling_warning

    weak = ceiling_warning({"mean_dice": 0.31, "cases": 4})
    assert weak is not None and weak.startswith(
        "the segmenter's real ceiling (mean Dice 0.310 on 4 real labelled volume(s)) is under 0.5: it is "
        "too weak to score masks"
    )
    assert ceiling_warning({"mean_dice": CEILING_MIN_DICE, "cases": 4}) is None
    assert ceiling_warning({"skipped": "the real volumes have no labels"}) is None


def test_the_tables_print_the_ceiling_warning_and_the_skipped_line():
    from lad_fast.evaluate.render import tables

    base = {
        "features": {"extractor": "vqgan"},
        "realism": {"fid": 1.0, "volumes": [2, 2]},
        "references": {"real_vs_real": {"skipped": "x"}, "trivial": {"fid": 2.0, "volumes": [2, 2]}},
        "diversity": {"synthetic": 0.5, "real": 0.5},
        "intensity": {"real": {}, "synthetic": {}, "real_masks": "labels", "synthetic_masks": "none"},
    }
    out = tables({**base, "fidelity": {"organs": [], "warning": "W", "real": {"mean_dice": 0.1}}})
    assert out[-1] == "warning: W"
    out = tables(
        {
            **base,
            "fidelity": {
                "organs": [],
                "skipped": "mask fidelity skipped: S",
                "real": {"skipped": "no segmenter"},
            },
        }
    )
    assert out[-1] == "mask fidelity skipped: S"
