"""The README's code runs as written.

Every ```python block is executed on its own (fresh namespace, a temporary working directory), on
the eager backend as a CPU user gets it; the fused-op block runs once more through the Triton
interpreter (tests/conftest.py turns it on without a GPU). Every ``lrkd-fast`` command in the
```bash blocks is parsed by the real argument parser (nothing is run), and every
``python -m MODULE`` / ``bash FILE`` it names exists.
"""
import os
import re
import shlex
from pathlib import Path

import pytest

import lrkd_fast

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README) if kind == lang]


def _block_id(code: str) -> str:
    first = next(line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from")))
    return first[:40]


def _commands() -> list[list[str]]:
    """Shell commands of the bash blocks: comments dropped, continuations joined, `&&` chains split."""
    out = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    out.append(words)
    return out


def test_readme_has_the_expected_blocks():
    assert len(blocks("python")) >= 4, "the quickstart's python blocks went missing"
    assert len(README.splitlines()) <= 255, "the README is meant to stay a short product page"
    # the test command CI runs (.ci/run) is the one the README gives
    assert 'pip install -e ".[test]" && python -m pytest -q' in README
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("code", blocks("python"), ids=_block_id)
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write under runs/
    with lrkd_fast.set_backend("eager"):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_fused_op_block_runs_through_triton(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1" and not __import__("torch").cuda.is_available():
        pytest.skip("Triton cannot run here")
    code = next(b for b in blocks("python") if "lowrank_linear(" in b and "kd_loss(" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def _cli_commands():
    cmds = []
    for words in _commands():
        if words[0] == "lrkd-fast":
            cmds.append(words[1:])
        elif "lrkd_fast.cli" in words:  # torchrun ... -m lrkd_fast.cli ARGS
            cmds.append(words[words.index("lrkd_fast.cli") + 1:])
    return cmds


def test_bash_blocks_name_cli_commands_that_exist():
    assert _cli_commands(), "no lrkd-fast command found in the README"
    from lrkd_fast.cli import build_parser

    for argv in _cli_commands():
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version exit 0; a bad command or flag exits 2
            assert exc.code == 0, f"README command `lrkd-fast {' '.join(argv)}` does not parse"


def test_bash_blocks_name_modules_and_scripts_that_exist():
    for words in _commands():
        if words[:2] == ["python", "-m"] and words[2].startswith("benchmarks"):
            module = ROOT.joinpath(*words[2].split("."))
            assert module.with_suffix(".py").exists() or (module / "__main__.py").exists(), words[2]
        if words[0] == "bash":
            assert (ROOT / words[1]).exists(), words[1]


def test_links_point_into_the_repository():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"
            assert not target.startswith(".."), f"README links outside the repository: {target}"


DOCS = [ROOT / "docs" / "experiments.md"] + sorted((ROOT / "benchmarks" / "results").glob("*/README.md"))
RUNNER = "python -m benchmarks.swap_variants"


def _runner_commands():
    """Every swap_variants command the docs and the results CSV give (`...` abbreviates the runner)."""
    import csv

    cmds = []
    for doc in DOCS:
        for span in re.findall(r"`([^`]+)`", doc.read_text(encoding="utf-8")):
            span = RUNNER + span[3:] if span.startswith("... ") else span
            if span.startswith(RUNNER + " ") and "NAME" not in span:
                cmds.append(span)
    with open(ROOT / "benchmarks" / "results" / "swap_variants" / "variants.csv", newline="") as f:
        cmds += [row["command"] for row in csv.DictReader(f) if row["command"]]
    return cmds


def test_documented_experiment_commands_parse():
    from benchmarks.swap_variants import build_parser

    cmds = _runner_commands()
    assert len(cmds) > 40
    for cmd in cmds:
        words = shlex.split(cmd)
        try:
            build_parser().parse_args(words[3:])
        except SystemExit as exc:
            raise AssertionError(f"documented command does not parse: {cmd}") from exc


@pytest.mark.parametrize("path", [ROOT / "README.md"] + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_project_not_its_history(path):
    text = path.read_text(encoding="utf-8")
    for pattern in (r"\bsession\s*\d", r"\.\./shared", r"/tmp/", r"\bthe \w+ goal\b", r"\bearlier peak lr\b"):
        assert not re.search(pattern, text, re.I), f"{path.name}: {pattern!r}"
