"""The PostgreSQL job queue's tables and statements, apart from its logic in ``postgres.py``:
what a schema change touches is here.

The tables carry an ``ls_autoseg_`` prefix, so the queue can live in a database that holds
other things (Label Studio's own, say). Times are epoch seconds from the queue's clock, as in
SQLite; ``owner`` and ``lease_until`` say which worker holds a running job and until when.
"""

from __future__ import annotations

from service.queue.base import JobState
from service.queue.journal import COLUMNS

SCHEMA_VERSION = 1
# Taken (transaction-scoped) while the schema is created or upgraded, so that instances
# starting at once do it one after the other: a fixed 64-bit number no other program of the
# database uses. ``take_turn`` locks (TURN_LOCK, hashtext(name)), one lock per pass name.
SCHEMA_LOCK = 0x6C73_6175_746F_0001
TURN_LOCK = 0x6C73_6174  # "lsat"; the two-int form of the advisory lock
CHANNEL = "ls_autoseg_jobs"  # NOTIFY'd when jobs become claimable


_STATES = ", ".join(f"'{s.value}'" for s in JobState)

# Indexes for the hot reads: claim walks queued jobs in id order (a partial index: the done
# ones never slow it), next_due wants the smallest not_before among them, lease expiry and a
# worker's own jobs read the running ones, prune and the failure list read by state and age.
SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS ls_autoseg_meta (key text PRIMARY KEY, value text NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS ls_autoseg_jobs (
        id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        project       bigint           NOT NULL,
        task          bigint           NOT NULL,
        model_version text             NOT NULL,
        state         text             NOT NULL CHECK (state IN ({_STATES})),
        attempts      integer          NOT NULL DEFAULT 0,
        reason        text,
        created_at    double precision NOT NULL,
        updated_at    double precision NOT NULL,
        not_before    double precision NOT NULL,
        suspect       boolean          NOT NULL DEFAULT false,
        owner         text,
        lease_until   double precision,
        UNIQUE (project, task, model_version)
    )""",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_queued ON ls_autoseg_jobs (id)"
    " WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_due ON ls_autoseg_jobs (not_before)"
    " WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_lease ON ls_autoseg_jobs (lease_until)"
    " WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_owner ON ls_autoseg_jobs (owner)"
    " WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_state_updated"
    " ON ls_autoseg_jobs (state, updated_at)",
    """CREATE TABLE IF NOT EXISTS ls_autoseg_workers (
        id           text PRIMARY KEY,
        host         text             NOT NULL,
        pid          integer          NOT NULL,
        started_at   double precision NOT NULL,
        heartbeat_at double precision NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ls_autoseg_turns (
        name    text PRIMARY KEY,
        last_at double precision NOT NULL
    )""",
)

# version -> the statements that take a database of that version to the next one (run before
# SCHEMA, which creates what is missing). Empty while there is one version.
UPGRADES: dict[int, tuple[str, ...]] = {}

INSERT_JOBS = (
    "INSERT INTO ls_autoseg_jobs"
    " (project, task, model_version, state, created_at, updated_at, not_before)"
    " SELECT %(project)s, t, %(version)s, 'queued', %(now)s, %(now)s, %(now)s"
    " FROM unnest(%(ids)s::bigint[]) AS t"
    " ON CONFLICT (project, task, model_version) DO NOTHING"
)

# Running jobs whose lease ran out: their worker vanished (killed, frozen, cut off). Like a
# crash on SQLite: out of attempts they fail, else they are queued again as suspect.
EXPIRE_LEASES = (
    "UPDATE ls_autoseg_jobs SET"
    " state = CASE WHEN attempts >= %(max)s THEN 'failed' ELSE 'queued' END,"
    " suspect = attempts < %(max)s,"
    " reason = CASE WHEN attempts >= %(max)s"
    "   THEN 'crashed the worker ' || attempts || ' times' ELSE reason END,"
    " owner = NULL, lease_until = NULL, updated_at = %(now)s"
    " WHERE id IN (SELECT id FROM ls_autoseg_jobs"
    "   WHERE state = 'running' AND lease_until < %(now)s FOR UPDATE SKIP LOCKED)"
    f" RETURNING {COLUMNS}"
)

TAKE = (
    "UPDATE ls_autoseg_jobs SET state = 'running', attempts = attempts + 1,"
    " updated_at = %(now)s, owner = %(me)s, lease_until = %(until)s"
    " WHERE id IN ({}) RETURNING " + COLUMNS
)
DUE_SUSPECT = (
    "SELECT id FROM ls_autoseg_jobs WHERE state = 'queued' AND suspect"
    " AND not_before <= %(now)s ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
DUE = (
    "SELECT id FROM ls_autoseg_jobs WHERE state = 'queued' AND NOT suspect"
    " AND not_before <= %(now)s ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
MINE_RUNNING = (
    "SELECT bool_or(suspect) FROM ls_autoseg_jobs WHERE state = 'running' AND owner = %(me)s"
)

RENEW = (
    "UPDATE ls_autoseg_jobs SET lease_until = %(until)s"
    " WHERE id = ANY(%(held)s) AND state = 'running' AND owner = %(me)s"
)
CONFIRM = (
    "UPDATE ls_autoseg_jobs SET lease_until = %(until)s"
    " WHERE id = ANY(%(ids)s) AND state = 'running' AND owner = %(me)s"
    " AND lease_until >= %(now)s RETURNING id"
)
REGISTER = (
    "INSERT INTO ls_autoseg_workers (id, host, pid, started_at, heartbeat_at)"
    " VALUES (%(me)s, %(host)s, %(pid)s, %(now)s, %(now)s)"
    " ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at"
)
# Workers silent this long are dropped from the registry (status shows the lost ones a while).
FORGET_WORKERS = "DELETE FROM ls_autoseg_workers WHERE heartbeat_at < %(before)s"

PRUNE = (
    "DELETE FROM ls_autoseg_jobs WHERE id IN (SELECT id FROM ls_autoseg_jobs"
    " WHERE state IN ('done', 'skipped') AND updated_at < %(before)s LIMIT %(limit)s)"
)
