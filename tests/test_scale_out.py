"""Scale-out end to end: two API replicas and two Celery workers on real PostgreSQL and Redis.

Needs PostgreSQL (CHARNN_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres)
and Redis (CHARNN_TEST_REDIS_URL, default redis://127.0.0.1:6379/15; that database is flushed).
Without them these tests skip locally and fail in CI (``CI=true``). Each module run gets a fresh
database (dropped at the end), which also names the events channel, so runs do not interfere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CHARNN, ROOT, Served, charnn_serve, free_port

pytestmark = pytest.mark.slow

PG_URL = os.environ.get("CHARNN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CHARNN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CORPUS = "the quick brown fox jumps over the lazy dog.\n" * 60
TINY = {"hidden_size": 16, "seq_length": 16, "batch_size": 4, "eval_every": 50, "max_steps": 200}
LONG = {**TINY, "max_steps": 1_000_000, "eval_every": 100_000, "patience": None}  # until cancelled
TERMINAL = ("succeeded", "failed", "cancelled")


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must run the scale-out tests")
    pytest.skip(why)


def _check_servers() -> None:
    try:
        import psycopg
        import redis
    except ImportError as e:  # the scale extra is not installed
        _unavailable(f"the scale-out extra is not installed ({e.name})")
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as e:
        _unavailable(f"PostgreSQL is unreachable at {PG_URL} ({e})")
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.flushdb()
        client.close()
    except (redis.RedisError, OSError) as e:
        _unavailable(f"Redis is unreachable at {REDIS_URL} ({e})")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_url: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the whole process group: the main process and its prefork children,
        as when the machine dies."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Cluster:
    a: Served
    b: Served
    env: dict[str, str]
    workdir: Path
    workers: list[Worker]
    stack: ExitStack

    def start_worker(self) -> Worker:
        n = len(self.workers) + 1
        log = self.workdir / f"worker-{n}.log"
        cmd = [str(CHARNN), "worker", "--concurrency", "1", "--loglevel", "info"]
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                env={**os.environ, **self.env, "CHARNN_WORKER_METRICS_PORT": str(port)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill9() takes the children too
            )
        worker = Worker(proc, log, f"http://127.0.0.1:{port}/metrics")
        self.workers.append(worker)
        self.stack.callback(worker.stop)
        wait_for(lambda: " ready." in worker.text() or proc.poll() is not None, 60, "worker up")
        assert proc.poll() is None, worker.text()
        return worker

    def serve(self, name: str, **env: str) -> Served:
        return self.stack.enter_context(charnn_serve(self.workdir / name, **{**self.env, **env}))


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``cond``; the timeout only bounds a failure, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _check_servers()
    import psycopg

    db = f"charnn_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    database_url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{db}"))
    env = {
        "CHARNN_DATABASE_URL": database_url,
        "CHARNN_BROKER_URL": REDIS_URL,
        "CHARNN_CHECKPOINT_EVERY_S": "0.3",
        "CHARNN_HEARTBEAT_S": "0.5",
        "CHARNN_DEAD_AFTER_S": "4",
    }
    workdir = tmp_path_factory.mktemp("scale-out")
    try:
        with ExitStack() as stack:
            a = stack.enter_context(charnn_serve(workdir / "api-a", **env))
            b = stack.enter_context(charnn_serve(workdir / "api-b", **env))
            c = Cluster(a, b, env, workdir, [], stack)
            c.start_worker()
            c.start_worker()
            try:
                yield c
            except BaseException:
                for w in c.workers:
                    print(f"--- {w.log.name}\n{w.text()[-5000:]}")
                raise
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def submit(url: str, hp: dict[str, Any], name: str = "scale") -> str:
    r = httpx.post(f"{url}/jobs", json={"corpus": CORPUS, "name": name, "hyperparameters": hp})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def job(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/jobs/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def ended(url: str, job_id: str) -> Callable[[], bool]:
    return lambda: job(url, job_id)["status"] in TERMINAL


def follow(url: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=120) as r:
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def finished_on_workers(cluster: Cluster) -> float:
    """charnn_jobs_finished_total{outcome="succeeded"} summed over the live workers'
    metrics ports (their pool processes count, in multiprocess mode)."""
    total = 0.0
    for w in cluster.workers:
        if w.proc.poll() is not None:
            continue
        text = httpx.get(w.metrics_url, timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "charnn_jobs_finished_total" and sample.labels == {
                    "outcome": "succeeded"
                }:
                    total += sample.value
    return total


def test_submit_on_one_replica_follow_on_the_other_predict_on_both(cluster: Cluster) -> None:
    finished_before = finished_on_workers(cluster)
    job_id = submit(cluster.a.url, TINY)
    events = follow(cluster.b.url, job_id)
    kind, final = events[-1]
    assert kind == "status" and final["status"] == "succeeded", events[-3:]
    assert any(k == "progress" and "train_loss" in e for k, e in events[:-1])  # from a worker
    model_id = final["model_id"]
    answers = [
        httpx.post(f"{s.url}/predict", json={"text": "the quick", "model": model_id}).json()
        for s in (cluster.a, cluster.b)
    ]
    assert answers[0]["model"] == model_id and answers[0] == answers[1]
    points = httpx.get(f"{cluster.a.url}/jobs/{job_id}/metrics").json()["points"]
    assert points and points[-1]["step"] == 200
    # each worker exports its own metrics: the job is counted once, by the one that ran it
    assert finished_on_workers(cluster) - finished_before == 1
    replica = httpx.get(f"{cluster.b.url}/metrics").text  # replicas read the shared store
    assert 'charnn_jobs{status="succeeded"}' in replica


def test_a_killed_worker_s_job_resumes_on_the_other_from_its_checkpoint(
    cluster: Cluster,
) -> None:
    from app.store.postgres import PostgresStore

    hp = {**TINY, "max_steps": 30_000, "eval_every": 10_000}
    job_id = submit(cluster.a.url, hp)
    wait_for(lambda: job(cluster.a.url, job_id)["progress"]["step"] >= 200, 60, "training")

    with PostgresStore(cluster.env["CHARNN_DATABASE_URL"]) as store:
        wait_for(lambda: store.read_state(job_id), 30, "a checkpoint in the store")
    owners = [w for w in cluster.workers if f"job {job_id}: claimed" in w.text()]
    assert len(owners) == 1, [w.text()[-2000:] for w in cluster.workers]
    owner = owners[0]
    owner.kill9()
    survivor = next(w for w in cluster.workers if w is not owner and w.proc.poll() is None)

    wait_for(lambda: f"job {job_id}: claimed" in survivor.text(), 60, "the job to be re-claimed")
    resumed = [line for line in survivor.text().splitlines() if f"job {job_id}: claimed" in line][0]
    assert "resuming from step" in resumed, resumed
    step = int(resumed.rsplit("resuming from step", 1)[1].split()[0])
    assert step > 0  # continues from the checkpoint, not from 0

    wait_for(ended(cluster.b.url, job_id), 120, "the job to end")
    done = job(cluster.b.url, job_id)
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 30_000
    assert not httpx.get(f"{cluster.a.url}/jobs", params={"status": "running"}).json()["items"]
    cluster.start_worker()  # back to two for the tests that follow


def test_a_stopped_worker_hands_its_job_back(cluster: Cluster) -> None:
    # SIGTERM to the main process only, as `docker stop` sends it.
    job_id = submit(cluster.a.url, {**TINY, "max_steps": 20_000, "eval_every": 10_000})
    wait_for(lambda: job(cluster.a.url, job_id)["progress"]["step"] >= 200, 60, "training")
    owner = next(w for w in cluster.workers if f"job {job_id}: claimed" in w.text())
    owner.proc.send_signal(signal.SIGTERM)
    assert owner.proc.wait(timeout=60) == 0, owner.text()[-3000:]
    wait_for(ended(cluster.b.url, job_id), 120, "the job to end")
    assert job(cluster.b.url, job_id)["status"] == "succeeded"
    survivor = next(w for w in cluster.workers if w.proc.poll() is None)
    assert f"job {job_id}: claimed by" in survivor.text()
    assert "resuming from step" in survivor.text().split(f"job {job_id}: claimed by", 1)[1]
    cluster.start_worker()


def test_cancel_reaches_the_running_worker(cluster: Cluster) -> None:
    job_id = submit(cluster.a.url, LONG)
    wait_for(lambda: job(cluster.b.url, job_id)["progress"]["step"] > 0, 60, "training")
    r = httpx.post(f"{cluster.b.url}/jobs/{job_id}/cancel", timeout=30)
    assert r.status_code == 200, r.text
    wait_for(ended(cluster.a.url, job_id), 30, "the job to end")
    assert job(cluster.a.url, job_id)["status"] == "cancelled"


def test_a_full_queue_refuses_with_429(cluster: Cluster) -> None:
    # Both workers busy plus one waiting job: the shared queue is full, on every replica.
    small = cluster.serve("api-small", CHARNN_MAX_QUEUED_JOBS="1")
    ids: list[str] = []
    try:
        refused = None
        for _ in range(len(cluster.workers) + 3):
            r = httpx.post(f"{small.url}/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            time.sleep(0.5)  # let a worker claim it if one is free
        assert refused is not None, "never refused"
        assert refused.headers["Retry-After"] and refused.json()["error"]["code"]
    finally:
        for job_id in ids:
            httpx.post(f"{cluster.a.url}/jobs/{job_id}/cancel", timeout=30)
    for job_id in ids:
        wait_for(ended(cluster.a.url, job_id), 30, "the cancelled job to end")


def test_a_model_deleted_on_one_replica_is_gone_on_the_other(cluster: Cluster) -> None:
    job_id = submit(cluster.a.url, TINY, name="doomed")
    wait_for(ended(cluster.a.url, job_id), 120, "the job to end")
    model_id = job(cluster.a.url, job_id)["model_id"]
    assert model_id
    body = {"text": "the", "model": model_id}
    assert httpx.post(f"{cluster.b.url}/predict", json=body).status_code == 200  # cached on B
    assert httpx.delete(f"{cluster.a.url}/models/{model_id}").status_code == 204
    # B learns of it from A's NOTIFY (within a millisecond or so here): once it has,
    # the model stays gone.
    gone = lambda: httpx.post(f"{cluster.b.url}/predict", json=body).status_code == 404  # noqa: E731
    wait_for(gone, 30, "B to see the deletion")
    for _ in range(20):
        assert httpx.post(f"{cluster.b.url}/predict", json=body).status_code == 404
    assert httpx.get(f"{cluster.b.url}/models/{model_id}").status_code == 404


# -- orphaned pool processes -------------------------------------------------------

# A stand-in for a worker's main process that did not set PR_SET_PDEATHSIG (Celery's
# prefork does, so its children usually die with it; this covers the ones that do
# not): it forks one pool process, which runs the task body exactly as Celery's pool
# process would, with the parent remembered as worker_process_init remembers it.
_ORPHAN_HARNESS = """
import logging, os, sys, time
pid = os.fork()
if pid:
    print(pid, flush=True)
    time.sleep(3600)  # the "main process", until the test kills it
else:
    logging.basicConfig(level=logging.INFO)
    import app.jobs.tasks as tasks
    tasks._pool_parent = os.getppid()
    tasks.train(sys.argv[1])
    os._exit(0)  # reached only if the job ended before its parent died
"""


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (an orphan's new parent may not): psutil-free."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: a zombie then still counts as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _sql(cluster: Cluster, query: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(cluster.env["CHARNN_DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(query.encode(), params).fetchall()


def _db_now(cluster: Cluster) -> float:
    return float(_sql(cluster, "SELECT extract(epoch FROM clock_timestamp())::float8")[0][0])


def _owner(cluster: Cluster, job_id: str) -> tuple[str | None, float | None]:
    row = _sql(cluster, "SELECT worker, heartbeat_at FROM charnn_jobs WHERE id = %s", job_id)
    return row[0][0], row[0][1]


def _has_checkpoint(cluster: Cluster, job_id: str) -> bool:
    rows = _sql(cluster, "SELECT state IS NOT NULL FROM charnn_jobs WHERE id = %s", job_id)
    return bool(rows[0][0])


def _models_of(cluster: Cluster, job_id: str) -> list[str]:
    return [r[0] for r in _sql(cluster, "SELECT id FROM charnn_models WHERE job_id = %s", job_id)]


def _assert_no_heartbeat_after(cluster: Cluster, job_id: str, worker: str, since: float) -> None:
    """While ``worker`` still owns the job, its heartbeat is not newer than ``since`` (plus
    the one UPDATE that may have been in flight), and does not move for a few beats."""
    owner, beat = _owner(cluster, job_id)
    if owner != worker:
        return  # already re-claimed: the new owner beats now
    assert beat is not None and beat <= since + 1.0, (beat, since)
    deadline = time.monotonic() + 2.0  # four heartbeat intervals
    while time.monotonic() < deadline:
        owner, later = _owner(cluster, job_id)
        if owner != worker:
            return
        assert later == beat, "the orphan is still heart-beating"
        time.sleep(0.1)


def _resumed_elsewhere(cluster: Cluster, job_id: str, worker: str) -> int:
    """The step another worker of the cluster resumed the job from (> 0: its checkpoint)."""
    claimed = re.compile(rf"job {job_id}: claimed by (\S+), resuming from step (\d+)")
    found = [m for w in cluster.workers for m in claimed.finditer(w.text())]
    assert found and all(m.group(1) != worker for m in found), [m.group(0) for m in found]
    return int(found[-1].group(2))


def test_killing_only_a_worker_s_main_process_leaves_no_orphan(cluster: Cluster) -> None:
    hp = {**TINY, "max_steps": 30_000, "eval_every": 10_000}
    job_id = submit(cluster.a.url, hp)
    wait_for(lambda: job(cluster.a.url, job_id)["progress"]["step"] >= 200, 60, "training")
    wait_for(lambda: _has_checkpoint(cluster, job_id), 30, "a checkpoint in the store")
    claimed = re.compile(rf"job {job_id}: claimed by (\S+), starting")
    owners = [(w, m) for w in cluster.workers if (m := claimed.search(w.text()))]
    assert len(owners) == 1, [w.text()[-2000:] for w in cluster.workers]
    owner, match = owners[0]
    worker = match.group(1)
    child = int(worker.split(":")[-2])  # host:pid:nonce of the pool process
    assert child != owner.proc.pid

    os.kill(owner.proc.pid, signal.SIGKILL)  # the main process only, not its group
    owner.proc.wait(timeout=10)
    killed_at = _db_now(cluster)
    wait_for(lambda: _exited(child), 60, "the orphaned pool process to exit")
    _assert_no_heartbeat_after(cluster, job_id, worker, killed_at)

    wait_for(ended(cluster.b.url, job_id), 120, "the job to end")
    done = job(cluster.b.url, job_id)
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 30_000
    assert _resumed_elsewhere(cluster, job_id, worker) > 0
    assert _models_of(cluster, job_id) == [done["model_id"]]  # exactly one model
    cluster.start_worker()  # back to two for the tests that follow


def test_an_orphaned_pool_process_stops_writing_and_exits(cluster: Cluster) -> None:
    from app.store.postgres import PostgresStore

    with PostgresStore(cluster.env["CHARNN_DATABASE_URL"]) as store:
        hp = {**TINY, "max_steps": 30_000, "eval_every": 10_000}
        # Stored but not sent: only the harness's pool process runs it, until it is orphaned.
        created = store.create_job("orphan", CORPUS, hp, 0, None, len(set(CORPUS)))
    job_id = created.id
    log = cluster.workdir / "orphan.log"
    with log.open("wb") as err:
        parent = subprocess.Popen(
            [sys.executable, "-c", _ORPHAN_HARNESS, job_id],
            cwd=ROOT,
            env={**os.environ, **cluster.env},
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # its own group: the cleanup takes the pool process too
        )

    def cleanup() -> None:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.wait(timeout=10)
        assert parent.stdout is not None
        parent.stdout.close()

    cluster.stack.callback(cleanup)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    wait_for(lambda: _has_checkpoint(cluster, job_id), 60, "a checkpoint from the pool process")
    worker, _ = _owner(cluster, job_id)
    assert worker is not None and worker.split(":")[-2] == str(child)

    os.kill(parent.pid, signal.SIGKILL)  # the main process only: the pool process lives on
    parent.wait(timeout=10)
    killed_at = _db_now(cluster)
    wait_for(lambda: _exited(child), 60, "the orphaned pool process to exit")
    text = log.read_text(errors="replace")
    assert "the worker's main process died" in text and "exiting" in text, text[-3000:]
    _assert_no_heartbeat_after(cluster, job_id, worker, killed_at)

    # A cluster worker's reaper re-queues it once the heartbeat is stale; it resumes there.
    wait_for(ended(cluster.a.url, job_id), 120, "the job to end")
    done = job(cluster.a.url, job_id)
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 30_000
    assert _resumed_elsewhere(cluster, job_id, worker) > 0
    assert _models_of(cluster, job_id) == [done["model_id"]]


def test_one_idempotency_key_on_two_replicas_makes_one_job(cluster: Cluster) -> None:
    """Submits racing with one key, half on each replica, leave one job (the key's UNIQUE
    row in the job's insert transaction); a different body with it is a 409 anywhere."""
    import threading

    name = f"idem-{uuid.uuid4().hex[:8]}"
    body = {"corpus": CORPUS * 20, "name": name, "hyperparameters": TINY}
    key = f"scale-{uuid.uuid4().hex}"
    n = 8
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def one(url: str) -> None:
        barrier.wait()
        r = httpx.post(f"{url}/jobs", json=body, headers={"Idempotency-Key": key}, timeout=60)
        with lock:
            answers.append(r)

    urls = [cluster.a.url, cluster.b.url] * (n // 2)
    threads = [threading.Thread(target=one, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * (n - 1) + [202], [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    (job_id,) = ids
    listed = httpx.get(f"{cluster.b.url}/jobs", params={"limit": 500}).json()["items"]
    assert [j["id"] for j in listed if j["name"] == name] == [job_id]
    other = httpx.post(
        f"{cluster.b.url}/jobs", json={**body, "seed": 9}, headers={"Idempotency-Key": key}
    )
    assert other.status_code == 409 and key in other.json()["error"]["message"], other.text
    wait_for(ended(cluster.a.url, job_id), 120, "the job to end")
    assert job(cluster.a.url, job_id)["status"] == "succeeded"
