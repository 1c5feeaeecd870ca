"""The import graph of lad_fast: no cycles, and nothing that uses trained weights depends on training.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a module, at the top level and inside functions (lazy imports count: they run
too), relative imports resolved against the module's package. ``kernels/``, ``export/`` and ``cli/``
are the installed subpackages ``lad_fast.kernels``, ``lad_fast.export`` and ``lad_fast.cli``.

A package is the node of its ``__init__.py``. ``from pkg import name`` is an edge to ``pkg.name`` when
that is a module, else to ``pkg`` (the name is then defined by its ``__init__``). Parent packages that
Python runs implicitly before a submodule are not edges: an ``__init__`` importing its children would
otherwise make every child a cycle.

Rules (DESIGN.md: "Loading a trained run ... is a layer below both train/ and generate"):

* no cycle between modules, and none between the units directly under ``lad_fast`` (a top-level
  module, or a subpackage with everything in it);
* every unit imports only units below it in :data:`LAYERS` (nothing runs upward);
* no unit but ``lad_fast.cli`` (and ``lad_fast.train`` itself), and no script ``bench/*.py`` but the
  training benches listed below with their reason, reaches ``lad_fast.train``, directly or through
  other modules: inference, export, evaluation and SSL never depend on training code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name -> source folder (pyproject's package-dir mapping).
PACKAGE_DIRS = {
    "lad_fast": ROOT / "lad_fast",
    "lad_fast.kernels": ROOT / "kernels",
    "lad_fast.export": ROOT / "export",
    "lad_fast.cli": ROOT / "cli",
}
TRAIN = "lad_fast.train"
# Modules (exact names, or prefixes ending in ".") that must not reach lad_fast.train.
NO_TRAIN = (
    "lad_fast.utils.",
    "lad_fast.kernels.",
    "lad_fast.conditioning.",
    "lad_fast.diffusion.",
    "lad_fast.models.",
    "lad_fast.data.",
    "lad_fast.runs.",
    "lad_fast.export.",
    "lad_fast.generate.",
    "lad_fast.preview.",
    "lad_fast.evaluate.",
    "lad_fast.ssl.",
)
# The units of lad_fast from the bottom up; a unit may import units of its own or a lower row only.
LAYERS = (
    ("lad_fast.errors", "lad_fast.organs"),
    ("lad_fast.config", "lad_fast"),  # the root package only re-exports errors and the version
    ("lad_fast.utils", "lad_fast.kernels"),
    ("lad_fast.conditioning", "lad_fast.diffusion"),
    ("lad_fast.models",),
    ("lad_fast.data",),
    ("lad_fast.runs",),
    ("lad_fast.export",),
    ("lad_fast.generate",),
    ("lad_fast.preview",),
    ("lad_fast.evaluate", "lad_fast.ssl"),
    ("lad_fast.train",),
    ("lad_fast.cli",),
)
# Benchmarks whose subject is training itself, with what the CLI cannot express for them. They load
# and predict through lad_fast.runs.loading like every other bench.
TRAINING_BENCHES = {
    "bench.ablation_locality": "trains two VQ-GANs that differ only in vqgan_loss.locality_weights, a "
    "config field no `lad-fast train` option sets",
    "bench.quality": "trains diffusion arms that differ in diffusion.objective and condition.spatial, "
    "config fields no `lad-fast train` option sets",
    "bench.bench_segmenter": "trains the segmenter in wall-clock-budgeted chunks (train_segmenter's "
    "stop_at + resume), which `lad-fast train segmenter` does not offer",
    "bench.trace_calls": "runs any lad-fast command in this process (`train` included) to count the "
    "files and functions it enters, which a subprocess cannot see",
    "bench.paper_table": "trains generators that differ in vqgan_loss.locality_weights, condition.drop_prob "
    "and diffusion.latent_norm, config fields no `lad-fast train` option sets",
    "bench.ssl_benchmark": "trains bench.paper_table's generators on each seed's few real cases (the "
    "scarcity protocol), for the same reason",
    "bench.gpu_suite": "its calibrate step times each model's real training step (train.plan.build_step: "
    "the trainer's modules, losses and optimiser) beside the plan's prediction, a step no command exposes",
}


# ------------------------------------------------------------------------------------- the graph


def module_files(package_dirs: Mapping[str, Path]) -> dict[str, tuple[Path, bool]]:
    """``{module name: (source file, is a package)}`` for every ``.py`` file under the folders."""
    out: dict[str, tuple[Path, bool]] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([package, *parts])] = (path, is_package)
    return out


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``a.b.attr`` -> ``a.b``)."""
    known = set(known)
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def imports_of(
    name: str, source: str, is_package: bool, known: Iterable[str], aliases: Mapping[str, str] | None = None
) -> set[str]:
    """Known modules that module ``name`` imports anywhere in ``source`` (lazy imports included).

    aliases: top-level names that stand for a module (a script's sibling imported by its bare name).
    """
    known = set(known)
    aliases = aliases or {}
    own_package = name.split(".") if is_package else name.split(".")[:-1]
    out: set[str] = set()

    def add(target: str) -> None:
        first, _, rest = target.partition(".")
        if first in aliases:
            target = aliases[first] + (f".{rest}" if rest else "")
        resolved = _resolve(target, known)
        if resolved is not None and resolved != name:
            out.add(resolved)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package[: len(own_package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            first, _, rest = module.partition(".")
            if first in aliases:
                module = aliases[first] + (f".{rest}" if rest else "")
            attributes = False
            for alias in node.names:
                if f"{module}.{alias.name}" in known:
                    add(f"{module}.{alias.name}")  # a submodule
                else:
                    attributes = True
            if attributes:
                add(module)
    return out


def import_graph(package_dirs: Mapping[str, Path] = PACKAGE_DIRS) -> dict[str, set[str]]:
    files = module_files(package_dirs)
    return {
        name: imports_of(name, path.read_text(encoding="utf-8"), is_package, files)
        for name, (path, is_package) in files.items()
    }


def unit_of(module: str, root: str = "lad_fast") -> str:
    """``lad_fast.train.loop`` -> ``lad_fast.train``; ``lad_fast.organs`` -> itself; the root -> itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == root and len(parts) > 1 else module


def unit_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        ua = unit_of(a)
        out.setdefault(ua, set())
        for b in targets:
            if unit_of(b) != ua:
                out[ua].add(unit_of(b))
    return out


# ------------------------------------------------------------------------------------- the checks


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one node, shortest
    first from the component's smallest name; ``[]`` when the graph is acyclic (self-edges ignored)."""
    nodes = sorted(set(graph) | {b for t in graph.values() for b in t})
    succ = {n: sorted(set(graph.get(n, ())) - {n}) for n in nodes}
    # Tarjan's strongly connected components (recursive: import graphs are small).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for n in nodes:
        if n not in index:
            visit(n)
    cycles = []
    for component in sorted(c for c in components if len(c) > 1):
        inside, start = set(component), component[0]
        # Breadth-first from start back to start, inside the component: a shortest cycle through it.
        parent: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w == start:
                        found = v
                        break
                    if w in inside and w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v != start:
            path.append(v)  # type: ignore[arg-type]
            v = parent[v]  # type: ignore[index]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def path_to(graph: Mapping[str, Iterable[str]], start: str, bad: str) -> list[str] | None:
    """A shortest import chain from ``start`` to ``bad`` or a module inside it; None when there is none."""
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w in parent:
                    continue
                parent[w] = v
                if w == bad or w.startswith(bad + "."):
                    chain = [w]
                    while parent[chain[-1]] is not None:
                        chain.append(parent[chain[-1]])  # type: ignore[arg-type]
                    return chain[::-1]
                nxt.append(w)
        frontier = nxt
    return None


def _bench_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The lad_fast graph plus one node ``bench.<script>`` per bench script (``_common`` is a sibling)."""
    scripts = {f"bench.{p.stem}": p for p in sorted((ROOT / "bench").glob("*.py"))}
    known = set(graph) | set(scripts)
    out = {k: set(v) for k, v in graph.items()}
    for name, path in scripts.items():
        out[name] = imports_of(
            name, path.read_text(encoding="utf-8"), False, known, {"_common": "bench._common"}
        )
    return out


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_package_and_lazy_imports(graph):
    assert {"lad_fast", "lad_fast.train", "lad_fast.kernels", "lad_fast.export", "lad_fast.cli"} <= set(graph)
    assert "lad_fast.kernels.conv3d" in graph and "lad_fast.cli.app" in graph
    # pipeline imports the trainers inside train_pipeline() only: a lazy import must be an edge
    assert "lad_fast.train.vqgan" in graph["lad_fast.train.pipeline"]


def test_no_import_cycle_between_modules(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_between_subpackages_and_top_level_modules(graph):
    cycles = find_cycles(unit_graph(graph))
    assert not cycles, "import cycles between units of lad_fast: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_unit_imports_only_its_own_row_or_lower_ones(graph):
    row = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    units = unit_graph(graph)
    assert set(units) == set(row), f"units not placed in LAYERS: {sorted(set(units) ^ set(row))}"
    upward = sorted(f"{a} -> {b}" for a, targets in units.items() for b in targets if row[b] > row[a])
    assert upward == [], "imports that run upward: " + "; ".join(upward)


def test_the_layer_check_sees_an_upward_import():
    g = {"lad_fast.runs.rundir": {"lad_fast.generate.writer"}, "lad_fast.generate.writer": set()}
    row = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    units = unit_graph(g)
    assert [(a, b) for a, ts in units.items() for b in ts if row[b] > row[a]] == [
        ("lad_fast.runs", "lad_fast.generate")
    ]


def test_nothing_that_uses_trained_weights_imports_training(graph):
    clients = [m for m in graph if any(m == p or (p.endswith(".") and m.startswith(p)) for p in NO_TRAIN)]
    assert {
        "lad_fast.generate.generate",
        "lad_fast.runs.loading",
        "lad_fast.runs.rundir",
        "lad_fast.runs.checkpoints",
        "lad_fast.ssl.network",
    } <= set(clients)
    assert any(m.startswith("lad_fast.export.") for m in clients)
    bad = {m: chain for m in clients if (chain := path_to(graph, m, TRAIN))}
    assert not bad, "these must not reach lad_fast.train: " + "; ".join(" -> ".join(c) for c in bad.values())


def test_benchmarks_import_no_training_except_the_training_benches(graph):
    full = _bench_graph(graph)
    benches = sorted(n for n in full if n.startswith("bench.") and n != "bench._common")
    assert "bench.condition_fidelity" in benches
    bad = {}
    for name in benches:
        chain = path_to(full, name, TRAIN)
        if name in TRAINING_BENCHES:
            # a stale entry would silently exempt a script that no longer needs it
            assert chain is not None, f"{name} no longer trains; remove it from TRAINING_BENCHES"
        elif chain is not None:
            bad[name] = chain
    assert not bad, "benchmarks must not reach lad_fast.train: " + "; ".join(
        " -> ".join(c) for c in bad.values()
    )


# ---------------------------------------------------------------------------- the checker itself


def test_find_cycles_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"a"}}) == []  # a self-edge is not a cycle between modules
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    # two components; within one, the shortest cycle through its smallest node
    g = {"a": {"b", "x"}, "b": {"a"}, "x": {"y"}, "y": {"a"}, "p": {"q"}, "q": {"p"}}
    assert find_cycles(g) == [["a", "b", "a"], ["p", "q", "p"]]


def test_unit_graph_finds_a_cycle_between_a_module_and_a_subpackage():
    g = {
        "lad_fast.runs.rundir": {"lad_fast.train.checkpoint"},
        "lad_fast.train.loop": {"lad_fast.runs.rundir"},
    }
    assert find_cycles(g) == []  # no module-level cycle ...
    assert find_cycles(unit_graph(g)) == [
        ["lad_fast.runs", "lad_fast.train", "lad_fast.runs"]
    ]  # ... one here


def test_path_to_reports_the_chain_through_other_modules():
    g = {"gen": {"trained"}, "trained": {"lad_fast.train.diffusion"}, "lad_fast.train.diffusion": set()}
    assert path_to(g, "gen", TRAIN) == ["gen", "trained", "lad_fast.train.diffusion"]
    assert path_to(g, "lad_fast.train.diffusion", "gen") is None
    assert path_to({"a": {"lad_fast.runs.loading"}}, "a", TRAIN) is None  # a prefix is not a parent package


def test_imports_of_sees_lazy_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "import os\n\ndef f():\n    from .b import g  # lazy and relative\n    return g\n",
        "b.py": "from pkg import sub\nfrom . import a\n",
        "sub/__init__.py": "from .. import b\nfrom ..sub.c import h\n",
        "sub/c.py": "import pkg.sub\nimport pkg.a.thing\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    g = import_graph({"pkg": pkg})
    assert g == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub", "pkg.a"},
        "pkg.sub": {"pkg.b", "pkg.sub.c"},
        "pkg.sub.c": {"pkg.sub", "pkg.a"},
    }
    assert find_cycles(g) == [["pkg.a", "pkg.b", "pkg.a"]]
