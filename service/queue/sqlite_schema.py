"""The SQLite job queue's tables, the rows ``claim`` takes and how rows and error codes read,
apart from the queue's logic in ``sqlite.py``: what a schema change touches is here."""

from __future__ import annotations

import sqlite3

from service.queue.base import JobState
from service.queue.journal import COLUMNS

SCHEMA_VERSION = 5  # 2: inbox; 3: jobs.suspect; 4: job_counts and its triggers; 5: turns
MIN_SQLITE = (3, 38, 0)  # RETURNING (3.35) and built-in JSON (3.38)


# Two indexes for the two hot reads: claim walks queued jobs in id order and stops after
# ``limit`` due ones; next_due wants the smallest not_before of the queued jobs. A partial
# index finds the few suspect jobs (left running by a crash) without walking the others;
# (state, updated_at) finds the done/skipped jobs old enough to prune without walking the
# rest. ``job_counts`` holds the jobs per state, kept by triggers, so that counting (every
# /metrics scrape) reads five rows instead of every job under the lock intake needs.
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
    not_before    REAL    NOT NULL,
    suspect       INTEGER NOT NULL DEFAULT 0  -- 1: left running by a crash, to run alone
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (project, task, model_version);
CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_state_due ON jobs (state, not_before);
CREATE INDEX IF NOT EXISTS jobs_suspect ON jobs (id) WHERE suspect = 1;
CREATE INDEX IF NOT EXISTS jobs_state_updated ON jobs (state, updated_at);
CREATE TABLE IF NOT EXISTS job_counts (
    state TEXT    PRIMARY KEY,
    n     INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO job_counts (state, n)
VALUES {", ".join(f"('{s.value}', 0)" for s in JobState)};
CREATE TRIGGER IF NOT EXISTS jobs_counted_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_counted_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TABLE IF NOT EXISTS turns (  -- when each periodic pass (reconcile) last ran
    name    TEXT PRIMARY KEY,
    last_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    id            INTEGER PRIMARY KEY,
    project       INTEGER NOT NULL,
    model_version TEXT    NOT NULL,
    task_ids      TEXT    NOT NULL,  -- a JSON array of ints
    received_at   REAL    NOT NULL
);
"""


def schema_statements() -> list[str]:
    """SCHEMA's statements one by one (a trigger's body holds ``;`` too), to run inside the
    caller's transaction (``executescript`` would commit it first)."""
    statements: list[str] = []
    pending = ""
    for line in SCHEMA.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    assert not pending.strip(), f"SCHEMA ends inside a statement: {pending!r}"
    return statements


# What a database of an older version lacks beyond the tables SCHEMA creates if missing:
# version -> the statements that take it to the next one (run before SCHEMA).
UPGRADES: dict[int, tuple[str, ...]] = {
    1: (),  # 2 added the inbox table: SCHEMA creates it
    2: ("ALTER TABLE jobs ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0",),
    # Filled from the jobs there are, before SCHEMA adds the triggers that keep it right.
    3: (
        "CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO job_counts (state, n) SELECT state, COUNT(*) FROM jobs GROUP BY state",
    ),
    4: (),  # 5 added the turns table: SCHEMA creates it
}

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


def claim_rows(conn: sqlite3.Connection, limit: int, now: float) -> list[tuple[object, ...]]:
    """The rows ``claim`` takes, inside its transaction: a due suspect job alone, once no
    job runs (nothing else meanwhile); else up to ``limit`` due jobs, oldest first."""
    take = (
        f"UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ?"
        f" WHERE id IN ({{}}) RETURNING {COLUMNS}"
    )
    suspect = conn.execute(
        "SELECT id, state FROM jobs INDEXED BY jobs_suspect WHERE suspect = 1"
        " AND (state = 'running' OR (state = 'queued' AND not_before <= ?))"
        " ORDER BY state = 'running' DESC, id LIMIT 1",
        (now,),
    ).fetchone()
    if suspect is not None:
        suspect_id, state = suspect
        busy = conn.execute("SELECT 1 FROM jobs WHERE state = 'running' LIMIT 1").fetchone()
        if state == "running" or busy is not None:
            return []
        return conn.execute(take.format("?"), (now, suspect_id)).fetchall()
    # INDEXED BY: without statistics the planner picks the not_before index and sorts
    # every due job; walking queued jobs in id order stops after ``limit``.
    due = (
        "SELECT id FROM jobs INDEXED BY jobs_state_id"
        " WHERE state = 'queued' AND not_before <= ? ORDER BY id LIMIT ?"
    )
    return conn.execute(take.format(due), (now, now, limit)).fetchall()
