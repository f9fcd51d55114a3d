"""Idempotency keys of ``POST /jobs`` (Stripe's convention), one table in each SQL store.

A key row names the job its first request created and a fingerprint of that
request; it is inserted in the *same transaction* as the job row, under a
PRIMARY KEY on the key, so two requests racing with one key leave one job: the
second's insert meets the first's key (PostgreSQL makes it wait for the first
transaction's end), its transaction rolls back, and it answers the first's job.
Deleting the job deletes its key (``ON DELETE CASCADE``), so the key is free again.
Keys past ``expires_at`` are ignored and purged by the next insert of any key.

Both tables are ``CREATE TABLE IF NOT EXISTS`` (no schema version to bump): an
older data directory or database gains the table when this charnn opens it, and
an older charnn ignores it. This module imports nothing of ``base.py``, which
names ``IdempotencyKey`` in the ``Store`` protocol.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Stripe's keys: a client-chosen string of up to 255 characters; printable ASCII here
# (an HTTP header cannot carry anything else reliably).
KEY = re.compile(r"[\x20-\x7e]{1,255}")
KEY_RULE = "1 to 255 printable ASCII characters (space to ~)"


@dataclass(frozen=True)
class IdempotencyKey:
    """What ``create_job`` records with the job: the key, the request's fingerprint, and
    how long the key holds."""

    key: str
    fingerprint: str
    ttl_s: float


class IdempotentReplay(Exception):  # noqa: N818 (not an error: the answer is an old job)
    """The key was used before with the same request: ``job_id`` is its job."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} already created job {job_id}")
        self.key, self.job_id = key, job_id


class IdempotencyMismatch(Exception):  # noqa: N818
    """The key was used before with a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was used with another request")
        self.key, self.job_id = key, job_id


def key_problem(key: str) -> str | None:
    """Why a header value is not a usable key, in words (None when it is)."""
    if KEY.fullmatch(key) is None:
        return f"Idempotency-Key must be {KEY_RULE}; got {len(key)} characters"
    return None


def fingerprint(
    corpus: str, name: str | None, hyperparameters: Mapping[str, Any], seed: int, init_from: Any
) -> str:
    """The request as parsed, hashed: the corpus's own hash and the normalised fields (every
    hyperparameter with its default filled in), so a JSON and a multipart body of the same
    submission, or one naming a default and one leaving it out, are the same request."""
    corpus_hash = hashlib.sha256(corpus.encode("utf-8", "surrogatepass")).hexdigest()
    fields = {
        "corpus_sha256": corpus_hash,
        "name": name,
        "hyperparameters": dict(hyperparameters),
        "seed": seed,
        "init_from": init_from,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyTable:
    """One store's spelling of the key table: its name, placeholder and clock."""

    table: str
    p: str
    now: str  # SQL for "now" in seconds since the epoch


SQLITE_KEYS = KeyTable("idempotency_keys", "?", "((julianday('now') - 2440587.5) * 86400.0)")
POSTGRES_KEYS = KeyTable(
    "charnn_idempotency_keys", "%s", "(SELECT extract(epoch FROM clock_timestamp())::float8)"
)


def ddl(t: KeyTable, jobs: str, real: str) -> tuple[str, ...]:
    """The table and its indexes (expiry for the purge, job for the cascade)."""
    return (
        f"""CREATE TABLE IF NOT EXISTS {t.table} (
            key TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            job_id TEXT NOT NULL REFERENCES {jobs} (id) ON DELETE CASCADE,
            expires_at {real} NOT NULL
        )""",
        f"CREATE INDEX IF NOT EXISTS {t.table}_expires ON {t.table} (expires_at)",
        f"CREATE INDEX IF NOT EXISTS {t.table}_job ON {t.table} (job_id)",
    )


SQLITE_DDL = ddl(SQLITE_KEYS, "jobs", "REAL")
POSTGRES_DDL = ddl(POSTGRES_KEYS, "charnn_jobs", "DOUBLE PRECISION")

Execute = Callable[[str, Sequence[Any]], Any]  # conn.execute / cur.execute: a cursor


def find(rows: Callable[[str, Sequence[Any]], Sequence[Any]], t: KeyTable, key: str) -> Any:
    """The live row of ``key`` (``fingerprint``, ``job_id``), or None: a read before the
    request is checked, so a replay answers even if the request would now be refused."""
    found = rows(
        f"SELECT fingerprint, job_id FROM {t.table} WHERE key = {t.p} AND expires_at > {t.now}",
        (key,),
    )
    return found[0] if found else None


def answer(key: IdempotencyKey, row: Any) -> None:
    """A live row of the key: raise what it means for this request."""
    if row["fingerprint"] == key.fingerprint:
        raise IdempotentReplay(key.key, str(row["job_id"]))
    raise IdempotencyMismatch(key.key, str(row["job_id"]))


def claim(execute: Execute, t: KeyTable, key: IdempotencyKey, job_id: str) -> None:
    """In the job insert's transaction, after the job row: make the key this job's, or
    raise ``IdempotentReplay``/``IdempotencyMismatch`` (the caller's transaction rolls back).

    Expired keys go first (this one too, if it had expired), then the insert; one that
    meets a live key (committed before, or by a racing transaction PostgreSQL waited
    for) inserts nothing and reads that key instead."""
    execute(f"DELETE FROM {t.table} WHERE expires_at <= {t.now}", ())
    cur = execute(
        f"INSERT INTO {t.table} (key, fingerprint, job_id, expires_at) "
        f"VALUES ({t.p}, {t.p}, {t.p}, {t.now} + {t.p}) ON CONFLICT (key) DO NOTHING",
        (key.key, key.fingerprint, job_id, key.ttl_s),
    )
    if cur.rowcount == 1:
        return
    row = execute(
        f"SELECT fingerprint, job_id FROM {t.table} WHERE key = {t.p}", (key.key,)
    ).fetchone()
    assert row is not None, "a key that conflicted is gone within the transaction"
    answer(key, row)
