"""House rules that CI enforces: the README's commands, lint, types, layering."""

from __future__ import annotations

import re
import shutil
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


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (dev extra)")
def test_ruff_is_clean() -> None:
    out = subprocess.run(["ruff", "check", str(ROOT)], capture_output=True, text=True)
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
