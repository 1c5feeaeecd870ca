"""SSL recipes side by side on the same seeds: one row per ``ssl_benchmark.py`` result JSON. Not a test.

Each probe is a ``bench/ssl_benchmark.py`` run with arms none, real and oracle and one recipe change
(``--transfer``, ``--pretrained-lr-scale``, ``--freeze-steps``, ``--pretrain-steps``,
``--contrastive-weight``); this script takes the seeds every given record has, so each row is measured
on the same draws, and reports per recipe the mean Dice of the five organs, spleen and pancreas per arm,
and the paired differences real - none, oracle - none and oracle - real (mean over the shared seeds).
The question item 3 of the benchmark asks: does any recipe make the oracle beat ``none`` and ``real``?

    python bench/ssl_probes.py bench/results/ssl_benchmark.json /work/ssl-probe/*.json \\
        --out bench/results/ssl_probes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")
ARMS = ("none", "real", "oracle")
RECIPE_KEYS = ("pretrain_steps", "contrastive_weight", "transfer", "pretrained_lr_scale", "freeze_steps")
DEFAULTS = {"pretrain_steps": 300, "contrastive_weight": 0.0, "transfer": "all", "pretrained_lr_scale": 1.0,
            "freeze_steps": 0}  # fmt: skip


def recipe(scale: dict[str, Any]) -> str:
    """The settings of a record that differ from the default recipe, as its row's name."""
    changed = [
        f"{k}={scale.get(k, DEFAULTS[k])}" for k in RECIPE_KEYS if scale.get(k, DEFAULTS[k]) != DEFAULTS[k]
    ]
    return ", ".join(changed) or "default"


def score(run: dict[str, Any], organ: str) -> float:
    d = run["dice"]
    return (
        sum(float(d.get(o, 0.0)) for o in ORGANS) / len(ORGANS) if organ == "mean" else float(d.get(organ, 0))
    )


def rows(records: list[tuple[Path, dict[str, Any]]], seeds: list[int] | None = None) -> dict[str, Any]:
    """{"seeds": the seeds every record holds (or ``seeds``), "rows": one per record}."""
    held = [set(r["scale"]["seeds"]) for _, r in records]
    shared = sorted(set.intersection(*held)) if seeds is None else sorted(seeds)
    if not shared or any(not set(shared) <= h for h in held):
        raise SystemExit(f"no seed common to every record (they hold {[sorted(h) for h in held]})")
    out = []
    for path, r in records:
        runs = next(iter(r["per_seed"].values()))
        missing = [a for a in ARMS if a not in runs]
        if missing:
            raise SystemExit(f"{path}: no {', '.join(missing)} arm; a probe runs none, real and oracle")
        row: dict[str, Any] = {"recipe": recipe(r["scale"]), "file": str(path), "arms": {}, "paired": {}}
        by_seed = {a: {x["seed"]: x for x in runs[a]} for a in ARMS}
        for organ in ("mean", "spleen", "pancreas"):
            vals = {a: [score(by_seed[a][s], organ) for s in shared] for a in ARMS}
            row["arms"][organ] = {a: round(sum(v) / len(v), 4) for a, v in vals.items()}
            row["paired"][organ] = {
                f"{a} - {b}": round(
                    sum(x - y for x, y in zip(vals[a], vals[b], strict=True)) / len(shared), 4
                )
                for a, b in (("real", "none"), ("oracle", "none"), ("oracle", "real"))
            }
        out.append(row)
    return {"seeds": shared, "rows": out}


def markdown(table: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, table["seeds"]))
    lines = [
        f"Seeds {seeds} (each row the same draws); mean Dice of the five organs per arm, and the paired "
        "differences (mean over these seeds); spleen and pancreas: oracle - none.",
        "",
        "| recipe | none | real | oracle | real - none | oracle - none | oracle - real "
        "| spleen: oracle - none | pancreas: oracle - none |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table["rows"]:
        m, p = r["arms"]["mean"], r["paired"]["mean"]
        organs = [r["paired"][o]["oracle - none"] for o in ("spleen", "pancreas")]
        cells = [r["recipe"], *(f"{m[a]:.3f}" for a in ARMS), *(f"{v:+.3f}" for v in p.values())]
        lines.append("| " + " | ".join(cells + [f"{v:+.3f}" for v in organs]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path, nargs="+", help="ssl_benchmark.py result JSONs, one recipe each")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: the seeds every record holds")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md too")
    args = ap.parse_args(argv)
    table = rows([(p, json.loads(p.read_text())) for p in args.records], args.seeds)
    md = markdown(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
