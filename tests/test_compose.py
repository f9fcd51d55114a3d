"""docker-compose.yml: no engine runs here, so its structure is checked against the code."""

from __future__ import annotations

from typing import Any

import yaml

from app.settings import Settings

from .conftest import ROOT


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_commands() -> None:
    services = compose()["services"]
    assert set(services) == {"api", "worker", "postgres", "redis"}
    assert services["api"]["command"][:2] == ["charnn", "serve"]
    assert "0.0.0.0" in services["api"]["command"]
    assert services["worker"]["command"][:2] == ["charnn", "worker"]
    for name in ("api", "worker"):
        needs = services[name]["depends_on"]
        assert needs == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name


def test_environment_names_real_settings_and_switches_to_scale_out() -> None:
    services = compose()["services"]
    known = {f"CHARNN_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert env["CHARNN_DATABASE_URL"].startswith("postgresql://")
        assert env["CHARNN_BROKER_URL"].startswith("redis://")
    pg = services["postgres"]["environment"]
    url = services["api"]["environment"]["CHARNN_DATABASE_URL"]
    assert url == (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
        f"{pg['POSTGRES_DB']}"
    )


def test_docker_compose_config_when_the_client_is_present() -> None:
    """`docker compose config` parses and validates the file without an engine."""
    import shutil
    import subprocess

    import pytest

    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here; the structure is checked above")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker client has no compose plugin; the structure is checked above")
    r = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
