"""``charnn check DIR [--repair]``: what is wrong with a data directory, and mending it.

The embedded store keeps rows in ``charnn.db`` and bytes in files; either can be
damaged or lost on its own (a bad disk block, a file deleted by hand, a
database truncated to 0 bytes). The check reads without changing anything:
SQLite's integrity check, every row through the same conversion the service
uses, and files against rows (model rows without their file, model files
without a row, job folders without a job, active jobs without their corpus).

``--repair`` (with the server stopped: it takes the data directory's lock)
mends what can be mended without guessing: a damaged or lost database is moved
aside (``charnn.db.damaged-<time>``) and a new one is built from the rows that
can still be read plus every model file that passes the same validation as an
upload (a model's file holds everything its row needs); rows that cannot be
read or whose model file is gone are dropped; job folders without a job are
removed; active jobs whose corpus is gone are marked failed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import (
    UNFINISHED_STATUSES,
    DataDirInUse,
    StoreError,
    dump_json,
    job_from_row,
    model_from_row,
    valid_id,
)
from .sqlite import DB_NAME, SqliteStore, lock_data_dir


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: int = 0
    repaired: int = 0

    @property
    def ok(self) -> bool:
        """No problem is left (every one found was repaired, or there was none)."""
        return self.problems <= self.repaired

    def info(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def problem(self, text: str) -> None:
        self.problems += 1
        self.lines.append(f"problem: {text}")

    def fixed(self, text: str) -> None:
        self.repaired += 1
        self.lines.append(f"repaired: {text}")


@dataclass
class _Rows:
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    bad_jobs: list[str] = field(default_factory=list)
    bad_models: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)


def check_data_dir(data_dir: Path, *, repair: bool = False) -> Report:
    report = Report()
    report.lines.append(f"checking {data_dir}{' (repairing)' if repair else ''}")
    if not data_dir.is_dir():
        report.problem(f"{data_dir} is not a directory")
        return report
    try:
        lock = lock_data_dir(data_dir)
    except DataDirInUse as e:
        if repair:
            report.problem(f"{e} (stop it before --repair)")
            return report
        report.info("a server is running on it: checking without changing anything")
        lock = -1
    except StoreError as e:
        report.problem(str(e))
        return report
    try:
        db = data_dir / DB_NAME
        damage, rows = _read_database(db, report)
        _compare_files(data_dir, rows, damage is not None, report)
    finally:
        if lock >= 0:
            os.close(lock)
    if repair and report.problems:
        _repair(data_dir, db, damage, rows, report)
    summary = "no problems" if report.problems == 0 else f"{report.problems} problem(s)"
    if repair and report.problems:
        summary += f", {report.repaired} repaired"
    report.lines.append(summary)
    return report


def _read_database(db: Path, report: Report) -> tuple[str | None, _Rows]:
    """(what is wrong with the database or None, the rows that could be read)."""
    rows = _Rows()
    if not db.is_file() or db.stat().st_size == 0:
        report.problem(f"{db.name} is missing or empty")
        return "missing", rows
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        report.problem(f"{db.name} cannot be opened: {e}")
        return "unopenable", rows
    damage = None
    with closing(conn):
        conn.row_factory = sqlite3.Row
        try:
            found = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as e:
            found = [str(e)]
        if found != ["ok"]:
            damage = found[0]
            report.problem(f"{db.name} fails SQLite's integrity check: {'; '.join(found[:5])}")
        _salvage(conn, "jobs", job_from_row, rows.jobs, rows.bad_jobs, report)
        _salvage(conn, "models", model_from_row, rows.models, rows.bad_models, report)
        try:
            rows.metrics = [dict(r) for r in conn.execute("SELECT * FROM metrics")]
        except sqlite3.DatabaseError as e:
            report.info(f"the loss curves cannot be read ({e})")
    report.info(f"{len(rows.jobs)} job(s) and {len(rows.models)} model(s) in {db.name}")
    return damage, rows


def _salvage(
    conn: sqlite3.Connection,
    table: str,
    convert: Callable[[Any], Any],
    good: dict[str, dict[str, Any]],
    bad: list[str],
    report: Report,
) -> None:
    try:
        raw = conn.execute(f"SELECT * FROM {table}").fetchall()
    except sqlite3.DatabaseError as e:
        report.problem(f"the {table} table cannot be read: {e}")
        return
    for row in raw:
        try:
            convert(row)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
            bad.append(str(row["id"]))
            report.problem(f"{table[:-1]} {row['id']} cannot be read: {e}")
        else:
            good[str(row["id"])] = dict(row)


def _compare_files(data_dir: Path, rows: _Rows, db_lost: bool, report: Report) -> None:
    model_files = {p.stem for p in (data_dir / "models").glob("*.npz") if valid_id(p.stem)}
    job_dirs = {p.name for p in (data_dir / "jobs").glob("*") if valid_id(p.name)}
    for model_id in sorted(set(rows.models) - model_files):
        report.problem(f"model {model_id} ({rows.models[model_id]['name']!r}) has no file")
    for model_id in sorted(set(rows.models) & model_files):
        why = _model_file_problem(data_dir / "models" / f"{model_id}.npz")
        if why is not None:
            rows.damaged_files.append(model_id)
            report.problem(f"model {model_id}'s file does not load: {why}")
    orphans = sorted(model_files - set(rows.models))
    if orphans:
        report.problem(
            f"{len(orphans)} model file(s) have no row"
            + (" (the database was lost: --repair rebuilds them)" if db_lost else "")
        )
    for job_id in sorted(job_dirs - set(rows.jobs) - set(rows.bad_jobs)):
        report.problem(f"job folder {job_id} has no job")
    for job_id, job in sorted(rows.jobs.items()):
        if (
            job["status"] in UNFINISHED_STATUSES  # a paused job resumes from its folder too
            and not (data_dir / "jobs" / job_id / "corpus.txt").is_file()
        ):
            report.problem(f"job {job_id} is {job['status']} but its corpus is gone")
    leftovers = [
        p.name
        for pattern in (".*.tmp", "models/.*", "jobs/.*", "jobs/*/.*.tmp")
        for p in data_dir.glob(pattern)
    ]
    if leftovers:
        report.info(f"{len(leftovers)} leftover temporary file(s): removed at the next start")


def _repair(data_dir: Path, db: Path, damage: str | None, rows: _Rows, report: Report) -> None:
    rebuilt = damage is not None
    if rebuilt:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = db.with_name(db.name + suffix)
            if old.exists():
                old.rename(db.with_name(f"{db.name}.damaged-{stamp}{suffix}"))
        report.fixed(f"moved the old database aside as {db.name}.damaged-{stamp}")
    try:
        store = SqliteStore(data_dir, check=False)
    except StoreError as e:
        report.problem(f"cannot open the data directory to repair it: {e}")
        return
    with store:
        conn = store._conn
        if rebuilt:
            _copy_rows(conn, rows)
            if rows.jobs or rows.models:
                report.fixed(
                    f"copied {len(rows.jobs)} job(s) and {len(rows.models)} model(s) that "
                    "could be read into a new database"
                )
        else:
            for job_id in rows.bad_jobs:
                conn.execute("DELETE FROM metrics WHERE job_id = ?", (job_id,))
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                report.fixed(f"dropped the unreadable job {job_id}")
            for model_id in rows.bad_models:
                conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
                report.fixed(f"dropped the unreadable model {model_id}")
        models_dir, jobs_dir = data_dir / "models", data_dir / "jobs"
        model_files = {p.stem for p in models_dir.glob("*.npz") if valid_id(p.stem)}
        for model_id in sorted(set(rows.models) - model_files):
            conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
            report.fixed(f"dropped model {model_id}, whose file is gone")
        for model_id in rows.damaged_files:
            conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
            path = models_dir / f"{model_id}.npz"
            path.rename(path.with_name(f"{path.name}.damaged"))
            report.fixed(f"dropped model {model_id}; its file is kept as {path.name}.damaged")
            model_files.discard(model_id)
        for model_id in sorted(model_files - set(rows.models) - set(rows.bad_models)):
            why = _import_model(conn, models_dir / f"{model_id}.npz")
            if why is None:
                report.fixed(f"rebuilt the row of model {model_id} from its file")
            else:
                report.lines.append(f"  kept model file {model_id}.npz: not importable ({why})")
        known = {r[0] for r in conn.execute("SELECT id FROM jobs")}
        for folder in sorted(p for p in jobs_dir.glob("*") if valid_id(p.name)):
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
                report.fixed(f"removed job folder {folder.name}, which had no job")
        for row in conn.execute(
            "SELECT id, status FROM jobs WHERE status IN ('queued', 'running')"
        ).fetchall():
            if not (jobs_dir / row[0] / "corpus.txt").is_file():
                conn.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                    (time.time(), "its corpus was lost from the data directory", row[0]),
                )
                report.fixed(f"marked job {row[0]} failed: its corpus is gone")


def _copy_rows(conn: sqlite3.Connection, rows: _Rows) -> None:
    for table, items in (
        ("jobs", list(rows.jobs.values())),
        ("models", list(rows.models.values())),
    ):
        for item in items:
            names = ", ".join(item)
            marks = ", ".join("?" for _ in item)
            conn.execute(
                f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})", list(item.values())
            )
    for point in rows.metrics:
        if point.get("job_id") in rows.jobs:
            names = ", ".join(point)
            marks = ", ".join("?" for _ in point)
            conn.execute(
                f"INSERT OR IGNORE INTO metrics ({names}) VALUES ({marks})", list(point.values())
            )


def _model_file_problem(path: Path) -> str | None:
    """Why a stored model's file does not load (strictly, as the server loads it), or None."""
    from model.checkpoint import load_model
    from model.errors import CheckpointError

    try:
        load_model(path)
    except (OSError, CheckpointError) as e:
        return str(e)
    return None


def _import_model(conn: sqlite3.Connection, path: Path) -> str | None:
    """Insert the row of a model file that passes an upload's validation; None if done,
    else why not."""
    from model.errors import CheckpointError

    from ..settings import Settings
    from .validation import validate_model_bytes

    try:
        data = path.read_bytes()
        valid = validate_model_bytes(data, Settings().model_limits, max_bytes=len(data) * 4 + 1)
    except (OSError, CheckpointError) as e:
        return str(e)
    job_id = valid.checkpoint.extra.get("job_id")
    conn.execute(
        "INSERT INTO models (id, name, created_at, job_id, hyperparameters, metrics, vocab, "
        "param_count, size_bytes, dtype) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            path.stem,
            valid.name or "recovered",
            path.stat().st_mtime,
            job_id if isinstance(job_id, str) else None,
            dump_json(valid.hyperparameters),
            dump_json(valid.metrics),
            dump_json(valid.vocab),
            valid.param_count,
            len(data),
            valid.dtype,
        ),
    )
    return None
