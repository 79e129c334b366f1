"""The SQLite job queue's tables and how its rows and error codes read, apart from the
queue's logic in ``sqlite.py``: what a schema change touches is here."""

from __future__ import annotations

import sqlite3

from service.queue.base import Job, JobState

SCHEMA_VERSION = 2  # 2: the inbox table
MIN_SQLITE = (3, 38, 0)  # RETURNING (3.35) and built-in JSON (3.38)

COLUMNS = (
    "id, project, task, model_version, state, attempts, reason, created_at, updated_at, not_before"
)

# Two indexes for the two hot reads: claim walks queued jobs in id order and stops after
# ``limit`` due ones; next_due wants the smallest not_before of the queued jobs.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY,
    project       INTEGER NOT NULL,
    task          INTEGER NOT NULL,
    model_version TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ({", ".join(f"'{s.value}'" for s in JobState)})),
    attempts      INTEGER NOT NULL DEFAULT 0,
    reason        TEXT,
    created_at    REAL    NOT NULL,
    updated_at    REAL    NOT NULL,
    not_before    REAL    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (project, task, model_version);
CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_state_due ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS inbox (
    id            INTEGER PRIMARY KEY,
    project       INTEGER NOT NULL,
    model_version TEXT    NOT NULL,
    task_ids      TEXT    NOT NULL,  -- a JSON array of ints
    received_at   REAL    NOT NULL
);
"""

# SQLite result codes (the low byte of an extended code) that mean someone else holds the
# database, or a resource may come back: worth another try later.
RETRYABLE_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL})
# Codes that mean the file itself is unusable: a wrong path, permissions, not a database.
CONFIG_CODES = frozenset(
    {
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_AUTH,
    }
)


def row_to_job(row: tuple[object, ...]) -> Job:
    (
        job_id,
        project,
        task,
        model_version,
        state,
        attempts,
        reason,
        created_at,
        updated_at,
        not_before,
    ) = row
    assert isinstance(job_id, int) and isinstance(project, int) and isinstance(task, int)
    assert isinstance(model_version, str) and isinstance(state, str)
    assert isinstance(attempts, int) and (reason is None or isinstance(reason, str))
    # REAL columns may hand back whole numbers as int (e.g. from RETURNING): float() them.
    assert isinstance(created_at, int | float) and isinstance(updated_at, int | float)
    assert isinstance(not_before, int | float)
    return Job(
        id=job_id,
        project=project,
        task=task,
        model_version=model_version,
        state=JobState(state),
        attempts=attempts,
        reason=reason,
        created_at=float(created_at),
        updated_at=float(updated_at),
        not_before=float(not_before),
    )
