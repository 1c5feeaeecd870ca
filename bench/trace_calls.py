"""Runtime trace of one ``lad-fast`` command: which project files and functions run, and how often.

Runs the CLI in this process under ``sys.setprofile`` and counts, for the project's own code
(``lad_fast/``, ``kernels/``, ``export/``, ``cli/``): the files entered, the distinct functions entered,
the distinct file-to-file call edges, and how many times a few named functions ran (opening a run
folder, parsing its config, finding the latest checkpoint, hashing a checkpoint). Functions are counted
by their qualified name, so the numbers compare across a refactor that moves modules.

    python bench/trace_calls.py --label after -- generate --run runs/x --out /tmp/g --n 2

Not a test: a measuring tool for refactors; ``--out`` appends the record as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = tuple(str(ROOT / d) + "/" for d in ("lad_fast", "kernels", "export", "cli"))
# Qualified names (function.__qualname__) whose call counts the record lists.
WATCHED = (
    "RunDir.open",
    "RunDir._raw_config",
    "RunDir.config",
    "config_from_dict",
    "latest_step_dir",
    "checkpoint_hash",
    "_check_args",
    "PreparedDataset.open",
    "PreparedDataset.__init__",
    "dataset_hash",
)


def trace(argv: list[str]) -> dict[str, object]:
    from lad_fast.cli.app import main as cli_main

    files: set[str] = set()
    functions: set[tuple[str, str]] = set()
    edges: set[tuple[str, str]] = set()
    calls: Counter[str] = Counter()

    def own(filename: str) -> str | None:
        return filename[len(str(ROOT)) + 1 :] if filename.startswith(SOURCE_DIRS) else None

    def profile(frame, event, arg):  # noqa: ANN001 (sys.setprofile's signature)
        if event != "call":
            return
        code = frame.f_code
        name = own(code.co_filename)
        if name is None:
            return
        files.add(name)
        functions.add((name, code.co_qualname))
        calls[code.co_qualname] += 1
        caller = frame.f_back
        if caller is not None:
            caller_name = own(caller.f_code.co_filename)
            if caller_name is not None and caller_name != name:
                edges.add((caller_name, name))

    sys.argv = ["lad-fast", *argv]
    sys.setprofile(profile)
    try:
        cli_main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        sys.setprofile(None)
    return {
        "argv": argv,
        "files": len(files),
        "functions": len(functions),
        "file_edges": len(edges),
        "calls": {name: calls.get(name, 0) for name in WATCHED},
        "file_list": sorted(files),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="", help="a name for this record (before, after, ...)")
    ap.add_argument("--out", type=Path, default=None, help="append the record to this JSON-lines file")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="the lad-fast command, after --")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    record = {"label": args.label, **trace(argv)}
    summary = {k: v for k, v in record.items() if k != "file_list"}
    print(json.dumps(summary, indent=1), file=sys.stderr)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
