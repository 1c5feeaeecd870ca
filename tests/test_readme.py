"""The README's two commands and ``.ci/run`` agree; the README's Python example runs; its links and the
docs' links lead somewhere.

``.ci/run`` finds the test command in README.md with ``grep -m1 -E PATTERN`` and runs that line; it
must find the README's second bash block (one line), not some other line, and the first block must
stay the main job (install, ``lad-fast train``, ``lad-fast generate``). The torch pin that ``.ci/run``
installs first must be the one both README commands name, or CI would test another torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_GREP = re.compile(r'grep -m1 -E "((?:[^"\\]|\\.)*)" README\.md')
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def grep_pattern(script: str) -> str:
    """The extended regular expression of ``.ci/run``'s README grep, with bash's double quotes undone."""
    found = _GREP.findall(script)
    if len(found) != 1:
        raise AssertionError(f".ci/run should grep README.md once, found {len(found)} greps")
    # Inside double quotes bash drops the backslash only before $ ` " \ (and newline).
    return re.sub(r'\\([$`"\\])', r"\1", found[0])


def top_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, text) of the fenced code blocks before the README's first ``## `` section."""
    head = readme.split("\n## ", 1)[0]
    return [(lang, text.strip()) for lang, text in _FENCE.findall(head)]


def matching_lines(pattern: str, text: str) -> list[str]:
    """The lines ``grep -E pattern`` prints (Python's re agrees with ERE on what the pattern uses)."""
    rx = re.compile(pattern)
    return [line for line in text.splitlines() if rx.search(line)]


def check(script: str, readme: str) -> str:
    """The README line CI runs; AssertionError naming the disagreement otherwise."""
    lines = matching_lines(grep_pattern(script), readme)
    assert len(lines) == 1, f".ci/run's pattern matches {len(lines)} README lines: {lines}"
    blocks = top_blocks(readme)
    assert len(blocks) >= 2 and all(lang == "bash" for lang, _ in blocks[:2]), (
        f"the README should open with two bash blocks, found {[lang or 'plain' for lang, _ in blocks]}"
    )
    main_job, tests = blocks[0][1], blocks[1][1]
    assert "lad-fast train" in main_job and "lad-fast generate" in main_job, (
        f"the first README block is not the main job: {main_job!r}"
    )
    assert tests == lines[0], f"CI runs {lines[0]!r}, but the README's second block is {tests!r}"
    pins = re.findall(r"pip install -q torch==([\w.+]+)", script)
    assert len(pins) == 1, f".ci/run should install one torch pin first, found {pins}"
    for block in (main_job, tests):
        assert re.findall(r"torch==([\w.+]+)", block) == pins, (
            f"{block!r} does not pin the torch .ci/run installs ({pins[0]})"
        )
    return lines[0]


def python_blocks(readme: str) -> list[str]:
    """The text of every fenced ``python`` block."""
    return [text for lang, text in _FENCE.findall(readme) if lang == "python"]


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# Results linked from the README before the benchmark that writes them lands (none now).
PENDING: set[str] = set()


def broken_links(doc: Path) -> list[str]:
    """Relative link targets of a markdown file that do not exist (web links are not followed)."""
    targets = [t for t in _LINK.findall(doc.read_text()) if "://" not in t and not t.startswith("mailto:")]
    return [t for t in targets if not (doc.parent / t).exists()]


def test_ci_runs_the_readme_test_command():
    line = check((ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text())
    assert "pytest" in line


README = """# x

```bash
pip install torch==1.0 -e . && lad-fast train && lad-fast generate --n 8 --out g
```

```bash
pip install torch==1.0 -e ".[dev]" && python -m pytest -q
```

## Later
"""
SCRIPT = r"""python -m pip install -q torch==1.0
cmd=$(grep -m1 -E "^pip install torch==1.0 -e \".\[dev\]\"" README.md || true)
"""


def test_the_check_accepts_an_agreeing_pair_and_names_each_disagreement():
    assert grep_pattern(SCRIPT) == '^pip install torch==1.0 -e ".\\[dev\\]"'
    assert check(SCRIPT, README) == 'pip install torch==1.0 -e ".[dev]" && python -m pytest -q'
    with pytest.raises(AssertionError, match="matches 2 README lines"):
        check(SCRIPT, README + '\npip install torch==1.0 -e ".[dev]" && echo again\n')
    with pytest.raises(AssertionError, match="matches 0 README lines"):
        check(SCRIPT, README.replace('".[dev]"', '".[test]"'))
    with pytest.raises(AssertionError, match="first README block is not the main job"):
        check(SCRIPT, README.replace(" && lad-fast generate --n 8 --out g", ""))
    swapped = README.replace("```bash\npip install torch==1.0 -e .", "```text\npip install torch==1.0 -e .")
    with pytest.raises(AssertionError, match=r"open with two bash blocks, found \['text', 'bash'\]"):
        check(SCRIPT, swapped)
    moved = README.replace('```bash\npip install torch==1.0 -e ".[dev]" && python -m pytest -q\n```\n', "")
    moved += '\n```bash\npip install torch==1.0 -e ".[dev]" && python -m pytest -q\n```\n'
    with pytest.raises(AssertionError, match="open with two bash blocks"):
        check(SCRIPT, moved)
    with pytest.raises(AssertionError, match=r"does not pin the torch .ci/run installs \(2.0\)"):
        check(SCRIPT.replace("-q torch==1.0", "-q torch==2.0"), README)


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys, tiny_phantoms):
    """The README's Python block, verbatim, in a folder whose ``runs/default`` is a run trained for two
    steps on three phantoms (the main job's run would take minutes): every name it uses exists and it
    writes what it says."""
    from _shared import small_config

    from lad_fast.train.diffusion import train_diffusion
    from lad_fast.train.vqgan import train_vqgan

    (code,) = python_blocks((ROOT / "README.md").read_text())
    run = tmp_path / "runs" / "default"
    cfg = small_config(diffusion_steps=2)
    train_vqgan(run, cfg, data=tiny_phantoms, device="cpu")
    train_diffusion(run, cfg, data=tiny_phantoms, device="cpu")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "README.md, Python API", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "['lad_000000.nii.gz', 'lad_000001.nii.gz']", printed
    manifest = (tmp_path / "generated-api" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 2


def test_readme_and_docs_links_lead_somewhere():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {d.name: [t for t in broken_links(d) if t not in PENDING] for d in docs}
    assert not any(broken.values()), f"links to missing files: {broken}"
    readme = (ROOT / "README.md").read_text()
    for target in PENDING:  # an entry stays only while the README links it
        assert f"]({target})" in readme, f"{target} is no longer linked; drop it from PENDING"


def test_the_link_check_sees_a_missing_file(tmp_path):
    (tmp_path / "there.md").write_text("x")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](there.md) [b](missing.png) [c](there.md#part) [d](https://example.org/x.md)\n")
    assert broken_links(doc) == ["missing.png"]
