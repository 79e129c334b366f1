"""The SQLite queue's row statements, on a connection the caller holds inside its transaction:
task ids as JSON arrays (``json_each`` turns one into many rows in one statement), inbox rows
of a bounded size, the count of ids still in the inbox, the jobs per state and pruning."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from service.queue import checks

# Ids per inbox row, so per expand transaction: expanding one row holds the write lock for
# ~10 ms, which is how long an accept (a webhook's answer) can wait behind an expansion.
INBOX_ROW_IDS = 5000


def json_ids(project: int, task_ids: Sequence[int], model_version: str) -> str:
    """The checked task ids as a JSON array for ``json_each`` ("" for none)."""
    ids = checks.job_args(project, task_ids, model_version)
    return json.dumps(ids) if ids else ""


def inbox_rows(project: int, task_ids: Sequence[int], model_version: str) -> list[str]:
    """The checked task ids as JSON arrays of at most ``INBOX_ROW_IDS`` each, one per row."""
    ids = checks.job_args(project, task_ids, model_version)
    return [json.dumps(ids[at : at + INBOX_ROW_IDS]) for at in range(0, len(ids), INBOX_ROW_IDS)]


def insert_inbox(
    conn: sqlite3.Connection, project: int, model_version: str, rows: list[str], at: float
) -> None:
    conn.executemany(
        "INSERT INTO inbox (project, model_version, task_ids, received_at) VALUES (?, ?, ?, ?)",
        ((project, model_version, ids, at) for ids in rows),
    )


def insert_jobs(
    conn: sqlite3.Connection, project: int, ids: str, model_version: str, at: float
) -> int:
    """Insert queued jobs for the JSON array ``ids``, dated ``at``; return how many were new."""
    # One statement over a JSON array: 5x faster than executemany, which pays Python
    # overhead per row. json_each keeps the array order, so job ids follow it. rowcount,
    # not total_changes: the latter also counts what the job_counts triggers write.
    return conn.execute(
        "INSERT OR IGNORE INTO jobs (project, task, model_version, state, attempts,"
        " created_at, updated_at, not_before)"
        " SELECT ?, value, ?, 'queued', 0, ?, ?, ? FROM json_each(?) ORDER BY key",
        (project, model_version, at, at, at, ids),
    ).rowcount


def prune_jobs(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Delete up to ``limit`` done or skipped jobs last changed before ``before``; return how
    many. Failed, queued and running jobs are never pruned: they are what an operator reads."""
    return conn.execute(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_state_updated"
        " WHERE state IN ('done', 'skipped') AND updated_at < ? LIMIT ?)",
        (before, limit),
    ).rowcount


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Jobs per state from ``job_counts`` (kept by triggers): five rows, whatever the jobs."""
    return {state: int(n) for state, n in conn.execute("SELECT state, n FROM job_counts")}


def inbox_ids(conn: sqlite3.Connection) -> int:
    (count,) = conn.execute(
        "SELECT COALESCE(SUM(json_array_length(task_ids)), 0) FROM inbox"
    ).fetchone()
    return int(count)


def take_turn(conn: sqlite3.Connection, name: str, now: float, interval_s: float) -> bool:
    """Record a pass of ``name`` at ``now`` unless one ran within ``interval_s`` (less 10%)."""
    return (
        conn.execute(
            "INSERT INTO turns (name, last_at) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            " SET last_at = excluded.last_at WHERE turns.last_at <= excluded.last_at - ?"
            " RETURNING name",
            (name, now, interval_s * 0.9),
        ).fetchone()
        is not None
    )


def running_ids(conn: sqlite3.Connection, job_ids: Sequence[int]) -> set[int]:
    """Which of ``job_ids`` are running."""
    return {
        row[0]
        for row in conn.execute(
            "SELECT id FROM jobs WHERE state = 'running'"
            " AND id IN (SELECT value FROM json_each(?))",
            (json.dumps([int(i) for i in job_ids]),),
        )
    }
