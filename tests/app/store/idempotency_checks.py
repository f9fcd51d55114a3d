"""Store-level checks of idempotency keys, run on SQLite (test_idempotency_sqlite.py) and
PostgreSQL (test_postgres_idempotency.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from app.store.base import Store
from app.store.idempotency import IdempotencyKey, IdempotencyMismatch, IdempotentReplay

CORPUS = "the quick brown fox jumps over the lazy dog. " * 20


def create(store: Store, key: IdempotencyKey) -> str:
    return store.create_job("idem", CORPUS, {}, 0, None, 28, idempotency=key).id


def check_racing_inserts_make_one_job(store: Store, n: int = 8) -> None:
    """``n`` inserts with one key released at once, past the read before the transaction
    (``store.idempotency_key`` answers None for all of them, as when they all read before
    any committed): one job; the others raise ``IdempotentReplay`` naming it."""
    key = IdempotencyKey("race", "a" * 64, 60.0)
    barrier = threading.Barrier(n)
    made: list[str] = []
    replays: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        barrier.wait()
        try:
            made.append(create(store, key))
        except IdempotentReplay as e:
            replays.append(e.job_id)
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(made) == 1 and replays == made * (n - 1)
    assert store.count_jobs() == 1
    if isinstance(store, NoPrecheck):  # the store's own read, past the mixin
        assert super(NoPrecheck, store).idempotency_key("race") == ("a" * 64, made[0])  # type: ignore[misc]


def check_keys_answer_mismatch_expire_and_free(store: Store) -> None:
    first = create(store, IdempotencyKey("k", "f1", 60.0))
    with pytest.raises(IdempotentReplay) as replay:
        create(store, IdempotencyKey("k", "f1", 60.0))
    assert replay.value.job_id == first
    with pytest.raises(IdempotencyMismatch):
        create(store, IdempotencyKey("k", "f2", 60.0))
    assert store.count_jobs() == 1
    # A short-lived key: once expired, it is free; the next insert purges the old row.
    short = create(store, IdempotencyKey("short", "s", 0.2))
    deadline = time.monotonic() + 30
    while store.idempotency_key("short") is not None:
        assert time.monotonic() < deadline, "the key never expired"
        time.sleep(0.05)
    again = create(store, IdempotencyKey("short", "s", 60.0))
    assert again != short and store.idempotency_key("short") == ("s", again)
    # Deleting a finished job frees its key (ON DELETE CASCADE).
    store.finish_job(first, "cancelled")
    assert store.delete_job(first)
    assert store.idempotency_key("k") is None
    assert create(store, IdempotencyKey("k", "f2", 60.0)) != first


class NoPrecheck:
    """Mixin: the store without the read before the transaction, so every insert takes the
    racing path (the key meets another's inside the insert's transaction)."""

    def idempotency_key(self, key: str) -> Any:
        return None
