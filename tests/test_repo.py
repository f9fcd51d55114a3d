"""House rules that CI enforces: the README's commands, lint, types, layering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The shell blocks of the README, one string per block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [b.strip() for b in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_blocks = [b for b in readme_commands() if "pytest" in b]
    assert test_blocks, "the README names no test command"
    command = test_blocks[0].splitlines()[-1]
    assert command in ci.splitlines(), f"{command!r} is not a line of .ci/run"


def test_ruff_is_clean() -> None:
    pytest.importorskip("ruff")
    cmd = [sys.executable, "-m", "ruff", "check", str(ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_model_never_imports_app() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "model").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+app\b", path.read_text(encoding="utf-8"), re.M)
    ]
    assert offenders == []


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, on a short run (the README's figures are from the full one)."""
    corpus = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"
    if not corpus.exists():
        pytest.skip("../shared/corpora/shakespeare.txt is not beside the checkout")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "TrainConfig" in b]
    assert len(blocks) == 1, "the README's library example (the block using TrainConfig)"
    code = blocks[0]
    assert "TrainConfig(max_steps=2000)" in code
    code = code.replace("TrainConfig(max_steps=2000)", "TrainConfig(max_steps=20, hidden_size=32)")
    code = code.replace('"../shared/corpora/shakespeare.txt"', repr(str(corpus)))
    code = code.replace("on_progress=print", "on_progress=None")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "shakespeare.npz").exists()


def test_every_test_the_docs_name_exists() -> None:
    """docs/reliability.md backs each promise with a test by name: the names must be real."""
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    for doc in ("reliability.md", "architecture.md"):
        text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
        named = {m[0] for m in re.findall(r"\b(test_\w+)(\.py)?", text) if not m[1]}
        missing = sorted(named - defined)
        assert missing == [], f"docs/{doc} names tests that do not exist: {missing}"
