"""House rules that CI enforces: the README's commands, lint, types, layering."""

from __future__ import annotations

import ast
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


# The layers of the code, bottom first: a module may import only from layers below
# its own (docs/architecture.md draws them). Peers on one layer (jobs and serving;
# api and client) do not import each other.
LAYERS: dict[str, int] = {
    "model": 0,
    "app.domain": 1,
    "app.settings": 2,
    "app.metrics": 2,
    "app.logs": 2,
    "app.store": 3,
    "app.errors": 4,
    "app.jobs": 5,
    "app.serving": 5,
    "app.api": 6,
    "app.client": 6,
    "app.main": 7,
    "app.cli": 7,
}
# The client talks HTTP with the schemas alone: it must stay light (no numpy, no server).
CLIENT_MAY_IMPORT = ("app.domain", "app.jobs.schemas", "app.serving.schemas")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "model":
        return "model"
    if parts[0] != "app" or len(parts) == 1:
        return None
    return f"app.{parts[1]}"


def imports_of(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, absolute, relative ones resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x`
    return found


def back_arrows(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that run against the layers."""
    here = layer_of(module)
    if here is None:
        return []
    bad = []
    for target in sorted(imports_of(module, source, is_package)):
        there = layer_of(target)
        if there is None or there == here:
            continue
        if there not in LAYERS:  # `from . import x` of a name, not a module
            continue
        if here == "app.client" and not target.startswith(CLIENT_MAY_IMPORT):
            bad.append(f"{module} -> {target} (the client imports only {CLIENT_MAY_IMPORT})")
        elif LAYERS[there] >= LAYERS[here]:
            bad.append(f"{module} -> {target}")
    return bad


def test_imports_run_one_way_down_the_layers() -> None:
    bad = []
    for path in [*(ROOT / "app").rglob("*.py"), *(ROOT / "model").rglob("*.py")]:
        rel = path.relative_to(ROOT).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        assert is_package or layer_of(module) in (*LAYERS, None), f"{module}: no layer"
        bad += back_arrows(module, path.read_text(encoding="utf-8"), is_package)
    assert bad == []


@pytest.mark.parametrize(
    ("module", "source", "arrow"),
    [
        ("model.rnn", "from app.settings import Settings", "model.rnn -> app.settings"),
        (
            "app.store.sqlite",
            "from ..jobs.lifecycle import Run",
            "app.store.sqlite -> app.jobs.lifecycle",
        ),
        ("app.jobs.local", "from app.serving import cache", "app.jobs.local -> app.serving"),
        ("app.serving.service", "from ..api import deps", "app.serving.service -> app.api"),
        ("app.domain", "import app.settings", "app.domain -> app.settings"),
        ("app.client", "from .jobs.service import JobService", "app.client -> app.jobs.service"),
        ("app.store", "from ..errors import NotFound", "app.store -> app.errors"),
    ],
)
def test_the_layer_check_catches_a_back_arrow(module: str, source: str, arrow: str) -> None:
    is_package = module == "app.store"
    found = back_arrows(module, source, is_package)
    assert found and found[0].startswith(arrow), found


def test_a_downward_import_is_allowed() -> None:
    assert back_arrows("app.api.jobs", "from ..jobs.service import JobService") == []
    assert back_arrows("app.client", "from .serving.schemas import PredictOut") == []
    assert back_arrows("app.jobs.body", "from model.train import Trainer") == []


LIGHT_IMPORTS = {
    # what is imported -> modules it must not bring with it
    "import app.client": ("numpy", "fastapi", "app.store"),
    "import model.config": ("numpy",),
    "import app.domain, app.settings": ("numpy",),
    # serving a model needs the checkpoint and the math, not the training loop
    "import app.serving.service": ("model.train", "model.shards", "model.data", "app.jobs"),
    # `charnn --help`
    "import sys; sys.argv = ['charnn', '--help']\nimport app.cli\ntry:\n    app.cli.main()\n"
    "except SystemExit:\n    pass": ("numpy", "model.train"),
}


@pytest.mark.parametrize("statement", list(LIGHT_IMPORTS))
def test_light_modules_stay_light(statement: str) -> None:
    code = f"{statement}\nimport sys\nprint('MODULES', *sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(out.stdout.rpartition("MODULES")[2].split())  # after what --help printed
    assert loaded, out.stderr
    heavy = [m for m in LIGHT_IMPORTS[statement] if m in loaded]
    assert heavy == [], f"{statement!r} imports {heavy}"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, on a short run (the README's figures are from the full one),
    with nothing but the package: the text is the shipped sample."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "TrainConfig" in b]
    assert len(blocks) == 1, "the README's library example (the block using TrainConfig)"
    code = blocks[0]
    full = "TrainConfig(hidden_size=192, max_steps=1000, eval_every=50)"
    assert full in code and "sample_text()" in code
    code = code.replace(full, "TrainConfig(max_steps=20, hidden_size=32)")
    code = code.replace("on_progress=print", "on_progress=None")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "hamlet.npz").exists()


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
