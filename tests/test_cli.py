"""The ``charnn`` console script, run as a user runs it: real processes, files and server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from model.checkpoint import load_model

from .conftest import CHARNN, ROOT, Served

PERIODIC = "abcd" * 300
TINY = ["--hidden-size", "16", "--seq-length", "16", "--batch-size", "8", "--eval-every", "50"]


def charnn(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHARNN), *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The failure is exit 1 and a single 'charnn: error:' line, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charnn: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    corpus = folder / "abcd.txt"
    corpus.write_text(PERIODIC, encoding="utf-8")
    out = folder / "abcd.npz"
    r = charnn("train", str(corpus), "--out", str(out), "--max-steps", "150", *TINY)
    assert r.returncode == 0, r.stderr
    assert "training" in r.stderr  # the progress bar
    assert "|g| " in r.stderr and ", lr " in r.stderr  # with the gradient norm and the lr
    assert "done after 150 steps" in r.stdout and str(out) in r.stdout
    return out


@pytest.mark.slow  # over a second: the full suite runs it
def test_console_script_and_help_for_every_command() -> None:
    assert CHARNN.exists(), "pip install -e . installs the charnn console script"
    commands = [[], ["serve"], ["train"], ["sample"], ["predict"], ["score"], ["remote"]]
    commands += [
        ["remote", c]
        for c in ("train", "jobs", "predict", "generate", "score", "models", "download", "upload")
    ]
    for cmd in commands:
        r = charnn(*cmd, "--help")
        assert r.returncode == 0 and "usage: charnn" in r.stdout, (cmd, r.stderr)
    train_help = charnn("train", "--help").stdout
    for flag in (
        "--hidden-size",
        "--seq-length",
        "--batch-size",
        "--learning-rate",
        "--optimizer",
        "--grad-clip",
        "--max-steps",
        "--time-limit",
        "--val-fraction",
        "--eval-every",
        "--dtype",
        "--seed",
        "--out",
    ):
        assert flag in train_help


@pytest.mark.slow  # over a second: the full suite runs it
def test_train_writes_a_model_that_predicts_samples_and_scores(
    trained: Path, tmp_path: Path
) -> None:
    ckpt = load_model(trained)
    assert ckpt.vocab.chars == ("a", "b", "c", "d") and ckpt.params.n_a == 16

    r = charnn("predict", str(trained), "abcdab", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["next"][0]["char"] == "c" and out["next"][0]["prob"] > 0.9
    table = charnn("predict", str(trained), "abcdab", "--top-k", "2").stdout
    assert table.splitlines()[0].split()[0] == "c" and "entropy" in table

    first = charnn("sample", str(trained), "--prompt", "ab", "--length", "40", "--seed", "3")
    again = charnn("sample", str(trained), "--prompt", "ab", "--length", "40", "--seed", "3")
    assert first.returncode == 0 and first.stdout == again.stdout
    assert first.stdout.startswith("ab") and len(first.stdout.rstrip("\n")) == 42
    stopped = charnn(
        "sample", str(trained), "--prompt", "ab", "--length", "40", "--seed", "3", "--stop", "da"
    )
    assert "da" not in stopped.stdout[2:] and len(stopped.stdout) < len(first.stdout)

    text = tmp_path / "t.txt"
    text.write_text("abcdabcd", encoding="utf-8")
    r = charnn("score", str(trained), f"@{text}")
    assert r.returncode == 0 and r.stdout.startswith("8 characters:") and "bits/char" in r.stdout
    assert charnn("score", str(trained), "-", stdin="abcd").stdout.startswith("4 characters:")


@pytest.mark.slow  # over a second: the full suite runs it
def test_errors_are_one_line_and_exit_1(trained: Path, tmp_path: Path) -> None:
    assert "cannot read" in one_line_error(
        charnn("train", str(tmp_path / "missing.txt"), "--out", "x.npz")
    )
    corpus = tmp_path / "c.txt"
    corpus.write_text(PERIODIC, encoding="utf-8")
    bad = charnn("train", str(corpus), "--out", str(tmp_path / "m.npz"), "--learning-rate", "-1")
    assert "learning_rate" in one_line_error(bad)
    assert "optimizer" in one_line_error(
        charnn("train", str(corpus), "--out", "m.npz", "--optimizer", "lbfgs")
    )
    assert "'x'" in one_line_error(charnn("predict", str(trained), "abx"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    one_line_error(charnn("predict", str(junk), "a"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    assert "not UTF-8" in one_line_error(charnn("score", str(trained), "-f", str(binary)))
    unreachable = charnn("remote", "models", "--url", "http://127.0.0.1:9")
    assert "127.0.0.1:9" in one_line_error(unreachable)
    bad_env = charnn("serve", env={"CHARNN_MAX_QUEUED_JOBS": "-1"})
    assert "CHARNN_MAX_QUEUED_JOBS" in one_line_error(bad_env)
    bad_json = charnn("serve", env={"CHARNN_CORS_ORIGINS": "[not json"})
    assert "cors_origins" in one_line_error(bad_json)
    usage = charnn("train")  # argparse: usage error, exit 2
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.slow
def test_remote_commands_against_charnn_serve(charnn_server: Served, tmp_path: Path) -> None:
    corpus = tmp_path / "abcd.txt"
    corpus.write_text(PERIODIC, encoding="utf-8")
    url = ["--url", charnn_server.url]
    r = charnn("remote", "train", str(corpus), "--wait", "--max-steps", "150", *TINY, *url)
    assert r.returncode == 0, r.stderr
    model_id = r.stdout.strip()
    assert len(model_id) == 32 and "succeeded" in r.stderr and "training" in r.stderr

    r = charnn("remote", "predict", "abcdab", "--json", *url)
    out = json.loads(r.stdout)
    assert out["model"] == model_id and out["next"][0]["char"] == "c"
    g1 = charnn("remote", "generate", "--prompt", "ab", "--length", "30", "--seed", "2", *url)
    g2 = charnn(
        "remote",
        "generate",
        "--prompt",
        "ab",
        "--length",
        "30",
        "--seed",
        "2",
        "--model",
        "abcd",
        *url,
    )
    assert g1.returncode == 0 and g1.stdout == g2.stdout and len(g1.stdout.rstrip("\n")) == 32
    assert charnn("remote", "score", "-", *url, stdin="abcd").stdout.startswith("4 characters:")

    listed = json.loads(charnn("remote", "models", "--json", *url).stdout)
    assert [m["id"] for m in listed["items"]] == [model_id]
    assert model_id in charnn("remote", "models", *url).stdout
    assert charnn("remote", "jobs", *url).stdout.count("succeeded") == 1

    path = tmp_path / "copy.npz"
    assert charnn("remote", "download", model_id, "--out", str(path), *url).returncode == 0
    assert load_model(path).vocab.chars == ("a", "b", "c", "d")
    up = charnn("remote", "upload", str(path), "--name", "copy", *url)
    copy_id = up.stdout.strip()
    assert up.returncode == 0 and copy_id != model_id
    a = json.loads(charnn("remote", "predict", "abca", "--json", "--model", model_id, *url).stdout)
    b = json.loads(charnn("remote", "predict", "abca", "--json", "--model", "copy", *url).stdout)
    assert a["next"] == b["next"]

    # the server's refusals are one line too
    assert "'nope'" in one_line_error(charnn("remote", "predict", "a", "--model", "nope", *url))
    assert "x" in one_line_error(charnn("remote", "predict", "abx", *url))


@pytest.mark.slow  # over a second: the full suite runs it
def test_ctrl_c_stops_training_and_still_saves_the_best_model(tmp_path: Path) -> None:
    corpus = tmp_path / "abcd.txt"
    corpus.write_text(PERIODIC, encoding="utf-8")
    out = tmp_path / "m.npz"
    cmd = [str(CHARNN), "train", str(corpus), "--out", str(out), "--max-steps", "1000000", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    while b"val " not in seen:  # the progress bar has shown a validation loss: past step 50
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, "charnn train ended before training"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert stdout.decode().startswith("interrupted after") and str(out) in stdout.decode()
    assert load_model(out).vocab.chars == ("a", "b", "c", "d")


@pytest.mark.slow  # over a second: the full suite runs it
def test_usage_errors_name_the_command_and_abbreviations_are_refused(tmp_path: Path) -> None:
    r = charnn("train", "c.txt", "--hidden", "16", "--out", "m.npz")
    assert r.returncode == 2 and r.stderr.startswith("usage: charnn train"), r.stderr
    assert "charnn train: error: unrecognized arguments: --hidden 16" in r.stderr
    r = charnn("remote", "score", "abc", "--modle", "x")
    assert r.returncode == 2 and r.stderr.startswith("usage: charnn remote score"), r.stderr
    assert "unrecognized arguments: --modle x" in r.stderr
    r = charnn("predict", "m.npz", "ab", "--top", "3")  # --top-k, abbreviated
    assert r.returncode == 2 and "unrecognized arguments: --top 3" in r.stderr
    for port, why in (
        ("73686", "out of range: use 1-65535"),
        ("0", "out of range"),
        ("http", "'http' is not a port number"),
    ):
        r = charnn("serve", "--port", port, "--data-dir", str(tmp_path / "d"))
        assert r.returncode == 2 and why in r.stderr, (port, r.stderr)
        assert r.stderr.startswith("usage: charnn serve")
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # over a second: the full suite runs it
def test_serve_names_a_busy_port_before_touching_the_data_dir(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = charnn("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    line = one_line_error(r)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "try --port " in line
    suggested = int(line.rsplit("--port ", 1)[1])
    assert suggested != port and 1 <= suggested <= 65535
    assert "serving on" not in r.stderr and not (tmp_path / "d").exists()
    r = charnn("serve", "--host", "no-such-host.invalid", "--port", "8000")
    assert "not an address or known host name" in one_line_error(r)


@pytest.mark.slow  # over a second: the full suite runs it
def test_text_arguments_and_files_alike(trained: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("abcdabcd", encoding="utf-8")
    for args in (["abcdabcd"], [f"@{text}"], ["-f", str(text)], ["--file", str(text)]):
        r = charnn("score", str(trained), *args)
        assert r.returncode == 0 and r.stdout.startswith("8 characters:"), (args, r.stderr)
    assert charnn("score", str(trained), "-f", "-", stdin="abcd").stdout.startswith("4 characters")
    assert "not both" in one_line_error(charnn("score", str(trained), "ab", "-f", str(text)))
    assert "no text" in one_line_error(charnn("score", str(trained)))
    # the old form, `score MODEL FILE`: the name is scored as text, and a note says how to
    # read the file instead
    (tmp_path / "abcd").write_text("dcba", encoding="utf-8")
    r = subprocess.run(
        [str(CHARNN), "score", str(trained), "abcd"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("4 characters:")
    assert "'abcd' is taken as the text itself" in r.stderr and "@abcd" in r.stderr
    out = json.loads(charnn("predict", str(trained), f"@{text}", "--json").stdout)
    assert out["text"] == "abcdabcd"
    assert json.loads(charnn("predict", str(trained), "--json").stdout)["text"] == ""


@pytest.mark.slow  # over a second: the full suite runs it
def test_train_on_the_shipped_example_fitted_to_it(tmp_path: Path) -> None:
    out = tmp_path / "h.npz"
    r = charnn(
        "train",
        "--example",
        "--fit",
        "--max-steps",
        "30",
        "--patience",
        "none",
        "--out",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "101,185 characters: H=192" in r.stderr  # what --fit chose, said once
    assert "done after 30 steps" in r.stdout
    ckpt = load_model(out)
    assert ckpt.params.n_a == 192 and ckpt.hyperparameters["patience"] is None
    assert "not both" in one_line_error(charnn("train", "x.txt", "--example", "--out", "m.npz"))
    assert "--example" in one_line_error(charnn("train", "--out", "m.npz"))
