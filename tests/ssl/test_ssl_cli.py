"""``lad-fast ssl pretrain / finetune`` end to end on tiny phantoms, and their one-line refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lad_fast.cli.app import main
from lad_fast.config import SegmenterConfig, get_preset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.generate.writer import IDENTITY, VolumeWriter
from lad_fast.ssl.data import GeneratedVolumes, SSLBatches
from lad_fast.ssl.settings import SSLConfig

SMALL = SegmenterConfig(channels=(8, 16, 32, 64), groups=4)  # the tiny preset's depth, fewer channels


def small_cfg():
    return replace(get_preset("tiny"), segmenter=SMALL)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Four tiny phantoms (3 labelled for training, 1 held out)."""
    from lad_fast.data.cache import phantom_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        return phantom_dataset("tiny", n=4)


def fake_generated(out: Path, phantoms: Path, n: int = 2, coarser: int = 1) -> Path:
    """A folder in `lad-fast generate`'s format holding phantom images (``coarser`` > 1: on another
    grid, every ``coarser``-th voxel at ``coarser`` times the spacing, as another preset would be)."""
    ds = PreparedDataset(phantoms)
    writer = VolumeWriter(out, {k: None for k in IDENTITY})
    writer.prepare(force=False)
    for i in range(n):
        item = ds[i]
        hu = (np.asarray(item["image"], dtype=np.float32) + 1) * 700 - 1000
        step = (slice(None, None, coarser),) * 3
        affine = np.asarray(item["affine"], dtype=np.float64).copy()
        affine[:3, :3] *= coarser
        writer.write(i, hu[step], np.asarray(item["mask"])[step], affine, {})
    writer.finalize()
    return out


def cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.err.strip()


def test_generated_volumes_mix_at_the_stated_ratio(phantoms, tmp_path):
    gen = fake_generated(tmp_path / "gen", phantoms)
    ds = PreparedDataset(phantoms)
    pool = GeneratedVolumes([gen], ds.geometry)
    assert len(pool) == 2 and pool[0].shape == tuple(ds.geometry.shape)
    # the round trip through int16 HU keeps the image (1 HU = 1/700 of the unit range)
    assert np.abs(pool[0].astype(np.float32) - np.asarray(ds[0]["image"], np.float32)).max() < 2e-3
    fractions = {}
    for ratio in (0.0, 0.5, 1.0):
        batches = SSLBatches(ds, [0, 1, 2], pool, 4, 0, SSLConfig(synthetic_ratio=ratio))
        flags = torch.cat([batches(step)["synthetic"] for step in range(40)])
        fractions[ratio] = flags.float().mean().item()
    assert fractions[0.0] == 0.0 and fractions[1.0] == 1.0 and 0.35 < fractions[0.5] < 0.65
    b = SSLBatches(ds, [0, 1, 2], pool, 2, 0, SSLConfig())
    first, again = b(3), b(3)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a pure function of the step
    assert torch.equal(first["input"][~first["mask"]], first["target"][~first["mask"]])


def test_a_second_view_is_drawn_only_for_the_contrastive_term(phantoms):
    ds = PreparedDataset(phantoms)
    plain = SSLBatches(ds, [0, 1, 2], None, 2, 0, SSLConfig())(5)
    both = SSLBatches(ds, [0, 1, 2], None, 2, 0, SSLConfig(contrastive_weight=1.0))(5)
    assert "view" not in plain and set(both) == set(plain) | {"view"}
    assert all(torch.equal(plain[k], both[k]) for k in plain)  # the first view as without the term
    assert both["view"].shape == both["input"].shape and not torch.equal(both["view"], both["input"])


def test_pretraining_with_the_contrastive_term(phantoms, tmp_path):
    from lad_fast.train.ssl import _ssl_json, finetune, pretrain

    ssl = SSLConfig(contrastive_weight=0.5)
    pretrain(tmp_path / "pre", small_cfg(), data=phantoms, ssl=ssl, steps=2, device="cpu")
    logged = [r for r in map(json.loads, (tmp_path / "pre" / "log.jsonl").read_text().splitlines())
              if r.get("model") == "ssl" and "losses" in r]  # fmt: skip
    assert logged[-1]["losses"]["contrastive"] > 0
    scores = finetune(
        tmp_path / "ft", small_cfg(), tmp_path / "pre", phantoms, labelled=2, steps=1, device="cpu"
    )
    assert scores["dice"]  # the projection head is an SSL head: not transferred, not in the way
    # the default recipe records its settings as before the term existed (so its runs still resume)
    assert "contrastive_weight" not in _ssl_json(SSLConfig()) and _ssl_json(ssl)["contrastive_weight"] == 0.5


def test_a_negative_contrastive_weight_is_refused(phantoms, tmp_path, capsys):
    code, err = cli(capsys, "ssl", "pretrain", "--data", str(phantoms), "--contrastive-weight", "-1",
                    "--run", str(tmp_path / "p"))  # fmt: skip
    assert code == 2 and "--contrastive-weight must be >= 0 (0: off), got -1.0" in err
    assert not (tmp_path / "p").exists()


def test_pretrain_then_finetune_none_and_pretrained_differ_only_in_initial_weights(phantoms, tmp_path):
    from lad_fast.train.ssl import finetune, pretrain

    gen = fake_generated(tmp_path / "gen", phantoms)
    cfg = small_cfg()
    result = pretrain(tmp_path / "pre", cfg, data=phantoms, synthetic=[gen], steps=2, device="cpu")
    assert result.step == 2
    logged = [r for r in map(json.loads, (tmp_path / "pre" / "log.jsonl").read_text().splitlines())
              if r.get("model") == "ssl" and "losses" in r]  # fmt: skip
    assert {"inpainting", "rotation", "rotation_acc", "synthetic_fraction"} <= set(logged[-1]["losses"])
    scores = {}
    for name, source in (("none", None), ("warm", tmp_path / "pre")):
        scores[name] = finetune(tmp_path / name, cfg, source, phantoms, labelled=2, steps=2, device="cpu")
    for s in scores.values():
        assert {"liver", "spleen", "kidney_right", "kidney_left", "pancreas"} <= set(s["dice"])
        assert s["held_out"] and s["cases"] == 1 and s["labelled"] == 2
    assert json.loads((tmp_path / "warm" / "finetune" / "dice.json").read_text()) == scores["warm"]
    metas = {}
    for n in scores:
        model_dir = tmp_path / n / "finetune"
        metas[n] = json.loads(
            (model_dir / (model_dir / "latest").read_text().strip() / "meta.json").read_text()
        )
    a, b = metas["none"], metas["warm"]
    assert a["model_config"] == b["model_config"] and a["data_hash"] == b["data_hash"]
    differ = {k for k in a["extra"] if a["extra"][k] != b["extra"].get(k)}
    # same data, cases and config: only the start differs
    assert differ == {"pretrained", "transferred", "transfer"}
    assert b["extra"]["transferred"] > 0 and a["extra"]["transferred"] == 0
    assert (tmp_path / "none" / "config.json").read_text() == (tmp_path / "warm" / "config.json").read_text()


def test_a_generated_folder_of_another_geometry_is_refused(phantoms, tmp_path, capsys):
    gen = fake_generated(tmp_path / "gen", phantoms, coarser=2)
    code, err = cli(capsys, "ssl", "pretrain", "--data", str(phantoms), "--synthetic", str(gen),
                    "--run", str(tmp_path / "r"), "--steps", "1", "--device", "cpu")  # fmt: skip
    assert code == 2 and err.count("\n") == 0
    assert "generated at another preset or geometry" in err and "shape (8, 32, 32)" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_folder_that_is_not_generated_is_refused(phantoms, tmp_path, capsys):
    code, err = cli(capsys, "ssl", "pretrain", "--data", str(phantoms), "--synthetic", str(tmp_path),
                    "--run", str(tmp_path / "r"), "--steps", "1", "--device", "cpu")  # fmt: skip
    assert code == 2 and "no manifest.jsonl" in err and err.count("\n") == 0


def test_more_labelled_cases_than_there_are_is_refused(phantoms, tmp_path, capsys):
    code, err = cli(capsys, "ssl", "finetune", "--pretrained", "none", "--labels", str(phantoms),
                    "--labelled", "4", "--run", str(tmp_path / "f"), "--device", "cpu")  # fmt: skip
    assert code == 2 and err.count("\n") == 0
    assert "--labelled 4" in err and "3 labelled case(s) besides the 1 held out" in err
    assert "choose K between 1 and 3" in err and not (tmp_path / "f").exists()


def test_a_pretrained_run_of_another_architecture_is_refused(phantoms, tmp_path, capsys):
    from lad_fast.train.ssl import pretrain

    pretrain(tmp_path / "pre", small_cfg(), data=phantoms, steps=1, device="cpu")  # SMALL, not tiny's
    rest = ["--labels", str(phantoms), "--labelled", "2", "--run", str(tmp_path / "f"), "--device", "cpu"]
    code, err = cli(capsys, "ssl", "finetune", "--pretrained", str(tmp_path / "pre"), *rest)
    assert code == 2 and err.count("\n") == 0
    assert "pretrained with another segmenter architecture" in err and "--preset" in err
    code, err = cli(capsys, "ssl", "finetune", "--pretrained", str(tmp_path / "nothing"), *rest)
    assert code == 2 and "no SSL pretraining checkpoint" in err and "--pretrained none" in err


# ---------------------------------------------------- the options the SSL benchmark's protocol needs


def _weights(run):
    from safetensors.torch import load_file

    model_dir = run / "finetune"
    return load_file(str(model_dir / (model_dir / "latest").read_text().strip() / "model.safetensors"))


def test_learning_curve_points_leave_training_unchanged(phantoms, tmp_path):
    from lad_fast.train.ssl import finetune

    cfg = small_cfg()
    plain = finetune(tmp_path / "plain", cfg, None, phantoms, labelled=2, steps=4, device="cpu")
    curved = finetune(
        tmp_path / "curved", cfg, None, phantoms, labelled=2, steps=4, device="cpu", eval_every=2
    )
    assert [p["step"] for p in curved["curve"]] == [2, 4]
    assert curved["curve"][-1]["dice"] == curved["dice"] == plain["dice"]  # the last point is the final score
    assert plain["curve"] == []
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "curved")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # evaluation changed nothing


def test_chosen_cases_are_the_ones_fine_tuned_on(phantoms, tmp_path, capsys):
    from lad_fast.train.ssl import finetune, held_out_cases

    ds = PreparedDataset(phantoms)
    held = ds.case_ids[held_out_cases(ds)[0]]
    train = [c for c in ds.case_ids if c != held]
    scores = finetune(tmp_path / "f", small_cfg(), None, phantoms, labelled=1, steps=1, device="cpu",
                      cases=[train[2]])  # fmt: skip
    assert scores["train_cases"] == [train[2]] and scores["labelled"] == 1
    rest = ["--labels", str(phantoms), "--run", str(tmp_path / "g"), "--device", "cpu", "--steps", "1"]
    code, err = cli(
        capsys, "ssl", "finetune", "--pretrained", "none", "--labelled", "1", "--cases", held, *rest
    )
    assert code == 2 and err.count("\n") == 0
    assert f"--cases {held}: cannot fine-tune on (held out or unlabelled): {held}" in err and train[0] in err
    code, err = cli(
        capsys, "ssl", "finetune", "--pretrained", "none", "--labelled", "2", "--cases", train[0], *rest
    )
    assert code == 2 and "--cases names 1 case(s) but --labelled is 2" in err
    code, err = cli(
        capsys, "ssl", "finetune", "--pretrained", "none", "--labelled", "1", "--cases", "nope", *rest
    )
    assert code == 2 and "no such case: nope" in err
    assert not (tmp_path / "g").exists()


def test_pretraining_on_chosen_cases(phantoms, tmp_path, capsys):
    from lad_fast.train.ssl import held_out_cases, pretrain

    ds = PreparedDataset(phantoms)
    held = ds.case_ids[held_out_cases(ds)[0]]
    train = [c for c in ds.case_ids if c != held]
    pretrain(tmp_path / "p", small_cfg(), data=phantoms, steps=1, device="cpu", cases=train[:2])
    model_dir = tmp_path / "p" / "ssl"
    meta = json.loads((model_dir / (model_dir / "latest").read_text().strip() / "meta.json").read_text())
    assert meta["extra"]["real_cases"] == 2
    pretrain(tmp_path / "all", small_cfg(), data=phantoms, steps=1, device="cpu")
    model_dir = tmp_path / "all" / "ssl"
    other = json.loads((model_dir / (model_dir / "latest").read_text().strip() / "meta.json").read_text())
    assert other["extra"]["real_cases"] == 3 and other["data_hash"] != meta["data_hash"]
    code, err = cli(capsys, "ssl", "pretrain", "--data", str(phantoms), "--cases", f"{train[0]},{held}",
                    "--run", str(tmp_path / "r"), "--steps", "1", "--device", "cpu")  # fmt: skip
    assert code == 2 and err.count("\n") == 0
    assert f"cannot pretrain on (held out for the fine-tuning Dice): {held}" in err
    assert not (tmp_path / "r").exists()


def test_pretrained_weights_get_the_scaled_learning_rate():
    from lad_fast.ssl.settings import FINETUNE
    from lad_fast.train.ssl import finetune_optimizer, initial_segmenter

    cfg = small_cfg()
    net, _ = initial_segmenter(cfg, 0, None)
    names = [n for n, _ in net.named_parameters() if not n.startswith("head.")]
    tcfg = FINETUNE["tiny"]
    opt = finetune_optimizer(net, tcfg, names, 0.1)
    pre, rest = opt.param_groups
    assert pre["lr"] == pytest.approx(tcfg.lr * 0.1) and rest["lr"] == pytest.approx(tcfg.lr)
    by_id = {id(p): n for n, p in net.named_parameters()}
    assert {by_id[id(p)] for p in pre["params"]} == set(names)
    assert {by_id[id(p)] for p in rest["params"]} == {
        n for n, _ in net.named_parameters() if n.startswith("head.")
    }
    assert len(finetune_optimizer(net, tcfg, names, 1.0).param_groups) == 1  # 1: the plain optimiser


def test_a_non_positive_lr_scale_is_refused(phantoms, tmp_path, capsys):
    code, err = cli(capsys, "ssl", "finetune", "--pretrained", "none", "--labelled", "1", "--labels",
                    str(phantoms), "--pretrained-lr-scale", "0", "--run", str(tmp_path / "f"))  # fmt: skip
    assert code == 2 and "--pretrained-lr-scale must be > 0, got 0.0" in err


def test_an_unknown_transfer_is_refused(phantoms, tmp_path, capsys):
    code, err = cli(capsys, "ssl", "finetune", "--pretrained", "none", "--labelled", "1", "--labels",
                    str(phantoms), "--transfer", "decoder", "--run", str(tmp_path / "f"))  # fmt: skip
    assert code == 2 and "--transfer must be one of all, encoder, got 'decoder'" in err
    assert not (tmp_path / "f").exists()


def test_frozen_pretrained_weights_stay_put_then_fine_tune():
    from lad_fast.ssl.settings import FINETUNE
    from lad_fast.train.schedule import lr_factor
    from lad_fast.train.ssl import finetune_optimizer, finetune_scheduler, initial_segmenter

    net, _ = initial_segmenter(small_cfg(), 0, None)
    names = [n for n, _ in net.named_parameters() if not n.startswith("head.")]
    tcfg = replace(FINETUNE["tiny"], steps=20, warmup_fraction=0.1)  # a 2-step ramp after unfreezing
    opt = finetune_optimizer(net, tcfg, names, 1.0, freeze_steps=2)
    sched = finetune_scheduler(opt, tcfg, freeze_steps=2)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    lrs = []
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        sched.step()
        if len(lrs) == 2:  # two frozen steps: weight decay moved nothing either
            now = dict(net.named_parameters())
            assert all(torch.equal(now[n], start[n]) for n in names)
            assert not torch.equal(now["head.weight"], start["head.weight"])
    base = lr_factor(tcfg)
    assert [pre for pre, _ in lrs] == [0.0, 0.0, pytest.approx(tcfg.lr * base(2) * 0.5)]
    assert [rest for _, rest in lrs] == [pytest.approx(tcfg.lr * base(s)) for s in range(3)]
    now = dict(net.named_parameters())
    assert any(not torch.equal(now[n], start[n]) for n in names)  # unfrozen at step 2
    plain = finetune_optimizer(net, tcfg, (), 1.0, freeze_steps=2)  # nothing pretrained: one group
    assert len(plain.param_groups) == 1 and len(finetune_scheduler(plain, tcfg, 2).lr_lambdas) == 1


def test_a_negative_freeze_is_refused(phantoms, tmp_path, capsys):
    code, err = cli(capsys, "ssl", "finetune", "--pretrained", "none", "--labelled", "1", "--labels",
                    str(phantoms), "--freeze-steps", "-1", "--run", str(tmp_path / "f"))  # fmt: skip
    assert code == 2 and "--freeze-steps must be >= 0 (0: never frozen), got -1" in err
    assert not (tmp_path / "f").exists()
