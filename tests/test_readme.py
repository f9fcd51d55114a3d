"""Every command in the README is exercised: run here as written, or by a named test or script.

Copy-paste rot is a bug: when a README command changes, this file notices.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.jobs.schemas import Hyperparameters
from app.settings import Settings
from model.sample import sample_text

from .conftest import ROOT, Served

README = (ROOT / "README.md").read_text(encoding="utf-8")
# A text with every character the README's examples use ("the ", "the end").
CORPUS = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters. The end.\n"
) * 40


def bash_blocks() -> list[str]:
    return list(re.findall(r"```bash\n(.*?)```", README, flags=re.S))


def block_with(marker: str) -> str:
    found = [b for b in bash_blocks() if marker in b]
    assert len(found) == 1, f"expected one README bash block containing {marker!r}"
    return found[0]


def commands(block: str) -> list[str]:
    """The commands of a block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    joined = re.sub(r"\|\n\s*", "| ", joined)
    out = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


# Commands the README shows that this file does not run, and what runs them instead.
COVERED_ELSEWHERE = {
    "curl -si http://127.0.0.1:8000/models/nope -H 'X-Request-ID: trace-me-1' | grep -i request": (
        "tests/test_observability.py::test_json_logs_are_one_object_per_line_with_the_request_id"
        " and tests/app/api/test_observe.py send X-Request-ID and read it back"
    ),
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && charnn serve": (
        ".ci/run installs the package the same way; tests/conftest.py:charnn_server runs "
        "`charnn serve` (tests/test_cli.py, test_readme_curl_walkthrough_runs)"
    ),
    "python3 -m venv .venv && . .venv/bin/activate": ".ci/run",
    "pip install -e '.[dev]' && python -m pytest": ".ci/run (tests/test_repo.py keeps them equal)",
    "docker build -t charnn .": ".ci/docker-check builds the same Dockerfile with buildah",
    "charnn check charnn-data": "tests/test_check.py runs it on healthy and damaged directories",
    "charnn check charnn-data --repair": "tests/test_check.py (database lost, damaged, rows "
    "and files that disagree)",
    "export CHARNN_DATABASE_URL=postgresql://charnn:charnn@db-host:5432/charnn": (
        "tests/test_scale_out.py starts API replicas and workers with these settings "
        "(pointing at this machine's PostgreSQL and Redis)"
    ),
    "export CHARNN_BROKER_URL=redis://redis-host:6379/0": "tests/test_scale_out.py",
    "charnn serve --host 0.0.0.0": "tests/test_scale_out.py (two API replicas)",
    "charnn worker": "tests/test_scale_out.py (two workers, one killed with SIGKILL)",
    "docker run -p 8000:8000 -v charnn-data:/data charnn": (
        ".ci/docker-check runs the image's CMD and checks /healthz, the user and SIGTERM"
    ),
}


def test_every_readme_command_is_exercised() -> None:
    ran_here = set()
    for marker in ("URL=http://127.0.0.1:8000", "charnn train corpus.txt", "charnn remote train"):
        ran_here.update(commands(block_with(marker)))
    ran_here.update(
        c for c in commands(block_with("bench/")) if c.startswith(("python bench/", "pip install"))
    )
    missing = [
        c
        for b in bash_blocks()
        for c in commands(b)
        if c not in ran_here and c not in COVERED_ELSEWHERE
    ]
    assert missing == [], "README commands no test exercises: add them here or to COVERED_ELSEWHERE"
    # and nothing is listed as covered that the README no longer shows
    shown = {c for b in bash_blocks() for c in commands(b)}
    assert set(COVERED_ELSEWHERE) <= shown, set(COVERED_ELSEWHERE) - shown
    assert (ROOT / ".ci" / "docker-check").exists()


def test_quick_start_starts_the_service_with_charnn_serve() -> None:
    serve = block_with("pip install -e . && charnn serve")
    assert commands(serve)[-1].endswith("&& charnn serve")
    assert "open http://127.0.0.1:8000/ in a browser" in README.replace("\n", " ")


def run_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = "set -euo pipefail\n" + block
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_readme_walkthrough_cli_and_remote_blocks_run(
    charnn_server: Served, tmp_path: Path
) -> None:
    # The walkthrough starts from the repository root, copying the shipped sample: here
    # the temporary directory stands in for it, with only the package's corpora folder.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "corpora").symlink_to(ROOT / "model" / "corpora")

    walkthrough = block_with("URL=http://127.0.0.1:8000")
    walkthrough = walkthrough.replace("URL=http://127.0.0.1:8000", f"URL={charnn_server.url}", 1)
    r = run_block(walkthrough, tmp_path, {})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert '"status":"succeeded"' in r.stdout.replace(" ", "") and '"next":' in r.stdout
    assert "101,185 characters: H=192" in r.stdout  # the suggestion for the sample
    # curl's answers are not newline-terminated: find /generate's among them
    found = re.findall(r'"text":("(?:[^"\\]|\\.)*"),"finish_reason"', r.stdout)
    assert len(found) == 1, r.stdout[-2000:]
    generated = json.loads(found[0])
    assert generated.startswith("the ") and len(generated) == 4 + 200  # with include_prompt
    assert (tmp_path / "demo.npz").stat().st_size > 1000
    assert (tmp_path / "corpus.txt").read_text(encoding="utf-8") == sample_text()

    local = run_block(block_with("charnn train corpus.txt"), tmp_path, {})
    assert local.returncode == 0, local.stderr[-2000:]
    assert "done after 300 steps" in local.stdout and "bits/char" in local.stdout
    assert (tmp_path / "hamlet.npz").exists() and "at step" in local.stdout

    remote = run_block(
        block_with("charnn remote train"), tmp_path, {"CHARNN_URL": charnn_server.url}
    )
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert "entropy" in remote.stdout and "demo" in remote.stdout
    assert "101185 characters:" in remote.stdout  # remote score @corpus.txt read the file
    assert (tmp_path / "demo-copy.npz").stat().st_size > 1000  # remote download by name


def test_readme_needs_nothing_beside_the_checkout() -> None:
    """Every example but the benchmarks' runs in a fresh clone: none reads ../shared."""
    benchmarks = README.index("## Benchmarks")
    end = README.index("\n## ", benchmarks + 1)
    outside = README[:benchmarks] + README[end:]
    blocks = re.findall(r"```\w*\n(.*?)```", outside, flags=re.S)
    assert blocks and not [b for b in blocks if "shared/" in b], "a README example needs ../shared"


@pytest.mark.slow
def test_readme_benchmark_commands_parse() -> None:
    """The benchmarks take minutes and torch: here each script must start and show its usage,
    and the bench extra must resolve (a dry run, nothing installed)."""
    for cmd in commands(block_with("bench/")):
        if cmd.startswith("python bench/"):
            script = cmd.split()[1]
            r = subprocess.run(
                [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True
            )
            assert r.returncode == 0 and "usage:" in r.stdout, (script, r.stderr[-500:])
        else:
            assert cmd == "pip install -e '.[bench]'"
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--dry-run",
                    "--no-deps",
                    "-e",
                    ".[bench]",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stderr[-1000:]


def _table(header: str) -> list[str]:
    start = README.index(header)
    rows = README[start:].split("\n\n")[0].splitlines()
    return rows[2:]


def test_settings_table_matches_the_settings() -> None:
    rows = _table("| variable | default | meaning |")
    names = [r.split("|")[1].strip().strip("`") for r in rows]
    assert names == [f"CHARNN_{n.upper()}" for n in Settings.model_fields]
    for row, field in zip(rows, Settings.model_fields.values(), strict=True):
        assert row.split("|")[3].strip() == field.description


def test_hyperparameter_table_matches_the_schema() -> None:
    rows = _table("| hyperparameter | default | allowed | meaning |")
    names = [r.split("|")[1].strip().strip("`") for r in rows]
    assert names == list(Hyperparameters.model_fields)
    for row, (name, field) in zip(rows, Hyperparameters.model_fields.items(), strict=True):
        assert row.split("|")[2].strip() == f"`{field.default}`", name


@pytest.mark.slow
def test_readme_python_client_block_runs(
    charnn_server: Served,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "app.client" in b
    ]
    assert len(blocks) == 1
    code = blocks[0].replace('Client("http://127.0.0.1:8000")', f"Client({charnn_server.url!r})")
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "succeeded" in out and "404 not_found no model with id or name 'no-such-model'" in out
    assert (tmp_path / "demo.npz").stat().st_size > 1000
