"""bench/ssl_benchmark.py's protocol, with its commands recorded instead of run: every arm of a seed
shares that seed's draw (real cases, labelled cases, fine-tuning seed), and only the pool differs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ssl_benchmark", ROOT / "bench" / "ssl_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def fake_runner(bench):
    """A Runner that writes what each command would leave behind and keeps the command lines."""

    class Fake(bench.Runner):
        def run(self, phase, cmd, shown):
            self.log.append({"phase": phase, "cmd": shown})
            if phase == "generator":
                run = Path(shown[3])
                run.mkdir(parents=True, exist_ok=True)
                bench.trained_marker(run).write_text("{}")
            elif phase == "generate":
                out = Path(_option(shown, "--out"))
                out.mkdir(parents=True, exist_ok=True)
                (out / "dataset.json").write_text("{}")
            elif phase == "pretrain":
                run = Path(_option(shown, "--run"))
                (run / "ssl").mkdir(parents=True, exist_ok=True)
                (run / "ssl" / "latest").write_text(f"step-{int(_option(shown, '--steps')):08d}")
            elif phase == "finetune":
                run = Path(_option(shown, "--run")) / "finetune"
                run.mkdir(parents=True, exist_ok=True)
                seed = int(_option(shown, "--seed"))
                dice = {"liver": 0.5 + 0.01 * seed, "spleen": 0.1, "kidney_right": 0.2, "kidney_left": 0.2,
                        "pancreas": 0.05}  # fmt: skip
                curve = [{"step": 1, "dice": dice}]
                (run / "dice.json").write_text(json.dumps({"dice": dice, "curve": curve}))

    return Fake(jobs=1)


def fake_dataset(path: Path, n: int = 20) -> Path:
    cases = [{"id": f"c{i:02d}", "has_mask": True} for i in range(n)]
    for c in cases:
        (path / "cases" / c["id"]).mkdir(parents=True)
        (path / "cases" / c["id"] / "image.npy").write_text("x")
    (path / "index.json").write_text(json.dumps({"cases": cases}))
    return path


def test_every_arm_of_a_seed_shares_its_draw(bench, tmp_path):
    from lad_fast.ssl.stats import draw_cases

    data = fake_dataset(tmp_path / "data")
    pool = [f"c{i:02d}" for i in range(16)]
    args = bench.parse(["--quick", "--work", str(tmp_path / "w"), "--labelled", "1", "2", "--seeds", "0", "1",
                        "2", "--arms", *bench.ARMS, "--shared-generator"])  # fmt: skip
    draws = {s: draw_cases(pool, s, args.unlabelled, args.n_extra) for s in args.seeds}
    runner = fake_runner(bench)
    per_k = bench.run_arms(args, data, draws, runner)
    cmds = [(e["phase"], e["cmd"]) for e in runner.log]
    finetunes = [c for p, c in cmds if p == "finetune"]
    assert len(finetunes) == len(bench.ARMS) * 3 * 2  # every (arm, seed, K) once
    for seed in args.seeds:
        for k in (1, 2):
            mine = [
                c
                for c in finetunes
                if _option(c, "--seed") == str(seed) and _option(c, "--labelled") == str(k)
            ]
            assert len(mine) == len(bench.ARMS)
            assert {_option(c, "--cases") for c in mine} == {",".join(draws[seed].real[:k])}
            assert {_option(c, "--steps") for c in mine} == {str(args.finetune_steps)}
    pretrains = {(_option(c, "--seed"), Path(_option(c, "--run")).name.split("-s")[0]): c for p, c in cmds
                 if p == "pretrain"}  # fmt: skip
    assert len(pretrains) == 5 * 3  # every pretrained arm once per seed, shared by both K
    for seed in args.seeds:
        real = ",".join(draws[seed].real)
        for arm in ("real", "real+lad_fast", "real+lad_official", "real+medical_diffusion"):
            assert _option(pretrains[(str(seed), arm)], "--cases") == real
        oracle = _option(pretrains[(str(seed), "oracle")], "--cases").split(",")
        assert oracle == [*draws[seed].real, *draws[seed].extra]
        share = _option(pretrains[(str(seed), "real+lad_fast")], "--synthetic-ratio")
        assert float(share) == pytest.approx(args.n_extra / (args.unlabelled + args.n_extra))
        assert "--synthetic" not in pretrains[(str(seed), "real")]
    # shared generator: trained once per row, on the first seed's U cases (lad_official on lad_fast's VQ-GAN)
    gens = [c for p, c in cmds if p == "generator"]
    assert sorted(c[2] for c in gens) == ["lad_fast", "lad_official", "medical_diffusion"]
    assert len([c for p, c in cmds if p == "generate"]) == 3  # and each generates once for all seeds
    subset = json.loads((tmp_path / "w" / "subsets" / "s0-u4" / "index.json").read_text())
    assert [c["id"] for c in subset["cases"]] == sorted(draws[0].real)
    official = next(c for c in gens if c[2] == "lad_official")
    assert official[5] == next(c for c in gens if c[2] == "lad_fast")[3]
    # results come back per K and arm in seed order, and a rerun runs nothing
    assert [r["seed"] for r in per_k["2"]["oracle"]] == [0, 1, 2]
    again = fake_runner(bench)
    bench.run_arms(args, data, draws, again)
    assert again.log == []


def test_generators_per_seed_by_default(bench, tmp_path):
    from lad_fast.ssl.stats import draw_cases

    data = fake_dataset(tmp_path / "data")
    args = bench.parse(["--work", str(tmp_path / "w"), "--seeds", "0", "1", "--unlabelled", "3",
                        "--n-extra", "4", "--pretrain-steps", "1", "--finetune-steps", "1"])  # fmt: skip
    draws = {s: draw_cases([f"c{i:02d}" for i in range(16)], s, 3, 4) for s in args.seeds}
    runner = fake_runner(bench)
    bench.run_arms(args, data, draws, runner)
    gens = [e["cmd"] for e in runner.log if e["phase"] == "generator"]
    assert len(gens) == 2 * 2  # lad_fast and lad_official, for each seed's own U
    for s in (0, 1):
        sub = json.loads((tmp_path / "w" / "subsets" / f"s{s}-u3" / "index.json").read_text())
        assert sorted(c["id"] for c in sub["cases"]) == sorted(draws[s].real)


def test_analysis_pairs_arms_by_seed(bench):
    def runs(values):
        return [{"dice": {o: v for o in bench.ORGANS}} for v in values]

    arms = {"none": [0.1, 0.2, 0.3], "real": [0.2, 0.3, 0.4], "real+lad_fast": [0.25, 0.35, 0.45],
            "oracle": [0.3, 0.4, 0.5]}  # fmt: skip
    res = bench.analyse({arm: runs(v) for arm, v in arms.items()})
    iv = res["paired"]["real+lad_fast - real"]["mean"]
    assert iv["diff"] == pytest.approx(0.05) and iv["lo"] == pytest.approx(0.05) and iv["excludes_zero"]
    assert res["paired"]["oracle - none"]["pancreas"]["diff"] == pytest.approx(0.2)
    assert res["recovered_fraction"]["real+lad_fast"]["mean"] == pytest.approx(0.5)
    assert res["summary"]["real"]["mean_of_organs"]["mean"] == pytest.approx(0.3)


def test_the_baselines_are_required(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--arms", "real", "oracle"])
    assert "--arms must include none and real" in capsys.readouterr().err


def test_a_freed_slot_goes_to_the_lowest_seed_waiting(bench):
    """The runner's slots hand a freed core to the waiting command of the lowest seed (then the earliest),
    so a benchmark cut short holds whole seeds."""
    import threading
    import time

    slots, order = bench.Slots(1), []

    def wait(priority: int) -> None:
        with slots.hold(priority):
            order.append(priority)

    with slots.hold(0):
        threads = [threading.Thread(target=wait, args=(p,)) for p in (3, 1, 2, 1)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(slots._waiting) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(slots._waiting) == 4
    for t in threads:
        t.join(10)
    assert order == [1, 1, 2, 3]
    assert slots.free == 1


def _record(bench, seeds, **scale):
    """A result record of ``seeds`` as main() writes it (only the fields merging reads)."""
    settings = {key: 1 for key in bench.SAME} | scale | {"seeds": list(seeds)}
    runs = [{"seed": s, "dice": {"liver": s / 10}} for s in seeds]
    per_seed = {"2": {"none": runs, "real": runs}}
    draws = {str(s): {"real": [f"r{s}"], "extra": [f"x{s}"]} for s in seeds}
    commands = [{"cmd": f"seed {s}"} for s in seeds]
    return {"command": f"run {seeds}", "scale": settings, "per_seed": per_seed, "draws": draws,
            "commands": commands}  # fmt: skip


def test_merging_pools_the_seeds_of_earlier_records_in_seed_order(bench):
    merged = bench.merge_runs(_record(bench, [4]), [(Path("old.json"), _record(bench, [2, 0, 1]))])
    assert merged["seeds"] == [0, 1, 2, 4]
    assert [r["seed"] for r in merged["per_seed"]["2"]["real"]] == [0, 1, 2, 4]
    assert [r["dice"]["liver"] for r in merged["per_seed"]["2"]["none"]] == [0.0, 0.1, 0.2, 0.4]
    assert list(merged["draws"]) == ["0", "1", "2", "4"] and merged["draws"]["1"]["real"] == ["r1"]
    assert len(merged["commands"]) == 4
    assert merged["merged_from"] == [{"file": "old.json", "command": "run [2, 0, 1]", "seeds": [2, 0, 1]}]


@pytest.mark.parametrize(
    ("earlier", "message"),
    [
        ({"seeds": [3, 4]}, "--merge old.json: seed(s) [4] are in this run too; a seed is counted once"),
        ({"finetune_steps": 600}, "--merge old.json: its finetune_steps is 600, this run's is 1; only runs"),
        ({"arms": ("none", "real", "oracle")}, "its arms for K = 2 are ['none', 'oracle', 'real'], this"),
    ],
)
def test_merging_refuses_records_that_are_not_the_same_benchmark(bench, earlier, message):
    seeds, arms = earlier.pop("seeds", [0]), earlier.pop("arms", None)
    old = _record(bench, seeds, **earlier)
    if arms:
        old["per_seed"]["2"] = {arm: [{"seed": s, "dice": {}} for s in seeds] for arm in arms}
    with pytest.raises(SystemExit) as err:
        bench.merge_runs(_record(bench, [4]), [(Path("old.json"), old)])
    assert message in str(err.value)


def test_a_record_from_before_a_setting_existed_merges_at_its_old_value(bench):
    old = _record(bench, [0])
    del old["scale"]["freeze_steps"]  # written before --freeze-steps: never frozen
    assert bench.merge_runs(_record(bench, [4], freeze_steps=0), [(Path("old.json"), old)])["seeds"] == [0, 4]
    with pytest.raises(SystemExit) as err:
        bench.merge_runs(_record(bench, [4], freeze_steps=50), [(Path("old.json"), old)])
    assert "its freeze_steps is 0, this run's is 50" in str(err.value)


def test_recipe_probes_are_compared_on_the_seeds_they_share():
    spec = importlib.util.spec_from_file_location("ssl_probes", ROOT / "bench" / "ssl_probes.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)

    def record(seeds, value, **scale):
        runs = {arm: [{"seed": s, "dice": {o: value[arm] + s / 100 for o in probes.ORGANS}} for s in seeds]
                for arm in probes.ARMS}  # fmt: skip
        return {"scale": {"seeds": seeds, **scale}, "per_seed": {"2": runs}}

    default = record([3, 4], {"none": 0.6, "real": 0.5, "oracle": 0.4})
    frozen = record([4], {"none": 0.6, "real": 0.65, "oracle": 0.7}, transfer="encoder", freeze_steps=100)
    table = probes.rows([(Path("a.json"), default), (Path("b.json"), frozen)])
    assert table["seeds"] == [4]
    assert [r["recipe"] for r in table["rows"]] == ["default", "transfer=encoder, freeze_steps=100"]
    assert table["rows"][0]["arms"]["mean"] == {"none": 0.64, "real": 0.54, "oracle": 0.44}
    assert table["rows"][1]["paired"]["pancreas"] == {"real - none": 0.05, "oracle - none": 0.1,
                                                      "oracle - real": 0.05}  # fmt: skip
    assert (
        "| transfer=encoder, freeze_steps=100 | 0.640 | 0.690 | 0.740 | +0.050 | +0.100 |"
        in probes.markdown(table)
    )
    with pytest.raises(SystemExit, match="no seed common to every record"):
        probes.rows(
            [(Path("a.json"), record([1], {"none": 0, "real": 0, "oracle": 0})), (Path("b.json"), frozen)]
        )


def test_one_seed_is_reported_without_an_interval(bench):
    runs = {
        arm: [{"dice": {o: v for o in bench.ORGANS}}]
        for arm, v in (("none", 0.6), ("real", 0.5), ("oracle", 0.7))
    }
    md = bench.markdown({"by_k": {"2": bench.analyse(runs)}, "scale": {"seeds": [4]}})
    assert "| oracle - real | +0.200 (1 seed, no interval) |" in md
    assert "]*" not in md and "Resolution" not in md
