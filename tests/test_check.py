"""`charnn check DIR [--repair]`: a damaged or lost database, files against rows, and
a server that refuses to start on a damaged directory with one line saying what to do."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .app.conftest import CORPUS, QUICK, Server
from .conftest import CHARNN, free_port

pytestmark = pytest.mark.slow
PREFIXES = ("", "t", "the quick brown f", "over the ")


def charnn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHARNN), *args], capture_output=True, text=True, timeout=120)


def predictions(url: str, model_id: str) -> list[object]:
    out = []
    for text in PREFIXES:
        r = httpx.post(f"{url}/predict", json={"text": text, "model": model_id}, timeout=10)
        assert r.status_code == 200, r.text
        out.append(r.json()["next"])
    return out


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[Path, dict[str, list[object]], dict[str, str]]]:
    """A data directory with two trained models; their predictions and names by id."""
    data = tmp_path / "data"
    server = Server(
        {
            "CHARNN_DATA_DIR": str(data),
            "CHARNN_JOB_THREADS": "1",
            "CHARNN_MAX_CONCURRENT_JOBS": "1",
        }
    )
    answers, names = {}, {}
    try:
        for seed, name in ((1, "first"), (2, "second")):
            body = {"corpus": CORPUS, "hyperparameters": QUICK, "seed": seed, "name": name}
            job_id = httpx.post(f"{server.url}/jobs", json=body).json()["id"]
            while (job := httpx.get(f"{server.url}/jobs/{job_id}").json())["status"] in (
                "queued",
                "running",
            ):
                time.sleep(0.05)
            assert job["status"] == "succeeded", job
            answers[job["model_id"]] = predictions(server.url, job["model_id"])
            names[job["model_id"]] = name
    finally:
        server.stop()
    yield data, answers, names


def serve_refuses(data: Path, *words: str) -> None:
    r = charnn("serve", "--port", str(free_port()), "--data-dir", str(data))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charnn: error: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def served_models_predict_as_before(
    data: Path, answers: dict[str, list[object]], names: dict[str, str]
) -> None:
    server = Server({"CHARNN_DATA_DIR": str(data), "CHARNN_JOB_THREADS": "1"})
    try:
        listed = httpx.get(f"{server.url}/models").json()["items"]
        assert {m["id"]: m["name"] for m in listed} == names
        for model_id, expected in answers.items():
            assert predictions(server.url, model_id) == expected
    finally:
        server.stop()


Trained = tuple[Path, dict[str, list[object]], dict[str, str]]


def test_a_healthy_directory_has_no_problems(trained: Trained) -> None:
    data, _, _ = trained
    r = charnn("check", str(data))
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "no problems"
    assert "2 job(s) and 2 model(s)" in r.stdout


@pytest.mark.parametrize("damage", ["garbage page", "truncated", "deleted"])
def test_a_damaged_or_lost_database_is_refused_then_rebuilt_from_the_model_files(
    trained: Trained, damage: str
) -> None:
    data, answers, names = trained
    db = data / "charnn.db"
    if damage == "garbage page":
        raw = bytearray(db.read_bytes())
        raw[4096 : 3 * 4096] = os.urandom(2 * 4096)
        db.write_bytes(bytes(raw))
    elif damage == "truncated":
        db.write_bytes(b"")
    else:
        db.unlink()
    serve_refuses(data, "charnn check")
    checked = charnn("check", str(data))
    assert checked.returncode == 1
    assert "problem:" in checked.stdout
    repaired = charnn("check", str(data), "--repair")
    assert repaired.returncode == 0, repaired.stdout
    if damage != "deleted":
        assert list(data.glob("charnn.db.damaged-*")), "the old database is kept aside"
    assert charnn("check", str(data)).returncode == 0
    served_models_predict_as_before(data, answers, names)


def test_rows_and_files_that_disagree_are_reported_and_mended(
    trained: Trained,
) -> None:
    data, answers, names = trained
    gone, kept = sorted(answers)
    (data / "models" / f"{gone}.npz").unlink()  # a model file deleted by hand
    rotten = "d" * 32  # a row whose file no longer loads (a bad disk block)
    (data / "models" / f"{rotten}.npz").write_bytes(b"PK\x03\x04" + bytes(64))
    stray = data / "jobs" / ("f" * 32)
    stray.mkdir()
    (stray / "corpus.txt").write_text("left over")
    conn = sqlite3.connect(data / "charnn.db")
    with conn:  # a row an old bug wrote
        conn.execute(
            "INSERT INTO models (id, name, created_at, job_id, hyperparameters, metrics, vocab, "
            "param_count, size_bytes, dtype) VALUES (?, 'bad', 1, NULL, '{}', '[]', '[]', 1, 1, "
            "'float32')",
            ("e" * 32,),
        )
        conn.execute(
            "INSERT INTO models (id, name, created_at, job_id, hyperparameters, metrics, vocab, "
            "param_count, size_bytes, dtype) VALUES (?, 'rotten', 1, NULL, '{}', '{}', '[\"a\"]', "
            "1, 1, 'float32')",
            (rotten,),
        )
    conn.close()
    r = charnn("check", str(data))
    assert r.returncode == 1
    assert f"model {gone} ('{names[gone]}') has no file" in r.stdout
    assert f"job folder {'f' * 32} has no job" in r.stdout
    assert f"model {'e' * 32} cannot be read" in r.stdout
    assert f"model {rotten}'s file does not load" in r.stdout
    fixed = charnn("check", str(data), "--repair")
    assert fixed.returncode == 0, fixed.stdout
    assert not stray.exists()
    assert (data / "models" / f"{rotten}.npz.damaged").exists()
    assert charnn("check", str(data)).returncode == 0
    served_models_predict_as_before(data, {kept: answers[kept]}, {kept: names[kept]})


def test_check_reads_a_running_servers_directory_and_repair_waits_for_it_to_stop(
    trained: Trained,
) -> None:
    data, _, _ = trained
    server = Server({"CHARNN_DATA_DIR": str(data), "CHARNN_JOB_THREADS": "1"})
    try:
        r = charnn("check", str(data))
        assert r.returncode == 0 and "a server is running on it" in r.stdout, r.stdout
        r = charnn("check", str(data), "--repair")
        assert r.returncode == 1 and "stop it before --repair" in r.stdout, r.stdout
    finally:
        server.stop()
