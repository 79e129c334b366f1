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
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_suspect ON ls_autoseg_jobs (id)"
    " WHERE state = 'queued' AND suspect",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_lease ON ls_autoseg_jobs (lease_until)"
    " WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_owner ON ls_autoseg_jobs (owner)"
    " WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS ls_autoseg_jobs_state_updated"
    " ON ls_autoseg_jobs (state, updated_at)",
    # A webhook body's ids, durable in one short insert (a 5000-job insert takes ~40 ms of the
    # server's CPU, ~350 ms with 8 bodies at once on 2 cores); claims expand them into jobs.
    """CREATE TABLE IF NOT EXISTS ls_autoseg_inbox (
        id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        project       bigint           NOT NULL,
        model_version text             NOT NULL,
        task_ids      bigint[]         NOT NULL,
        received_at   double precision NOT NULL
    )""",
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

# Job ids follow the array's order (as on SQLite); a key that exists in any state is skipped.
INSERT_JOBS = (
    "INSERT INTO ls_autoseg_jobs"
    " (project, task, model_version, state, created_at, updated_at, not_before)"
    " SELECT %(project)s, t.task, %(version)s, 'queued', %(now)s, %(now)s, %(now)s"
    " FROM unnest(%(ids)s::bigint[]) WITH ORDINALITY AS t (task, n) ORDER BY t.n"
    " ON CONFLICT (project, task, model_version) DO NOTHING"
)

# Ids per inbox row: what one expansion transaction inserts (~40 ms for 5000 jobs).
INBOX_ROW_IDS = 5000
INSERT_INBOX = (
    "INSERT INTO ls_autoseg_inbox (project, model_version, task_ids, received_at)"
    " VALUES (%(project)s, %(version)s, %(ids)s::bigint[], %(now)s)"
)
# Up to ``rows`` inbox rows no other claim is expanding, oldest first, turned into jobs in one
# statement (dated when accepted, in the bodies' order); one row per (project, version) with
# the ids given and the jobs new, and a NOTIFY for the other idle workers if any is new.
EXPAND = (
    "WITH taken AS (DELETE FROM ls_autoseg_inbox WHERE id IN (SELECT id FROM ls_autoseg_inbox"
    "   ORDER BY id LIMIT %(rows)s FOR UPDATE SKIP LOCKED)"
    "   RETURNING id, project, model_version, task_ids, received_at),"
    " added AS (INSERT INTO ls_autoseg_jobs"
    "   (project, task, model_version, state, created_at, updated_at, not_before)"
    "   SELECT taken.project, t.task, taken.model_version, 'queued', taken.received_at,"
    "   taken.received_at, taken.received_at"
    "   FROM taken, unnest(taken.task_ids) WITH ORDINALITY AS t (task, n)"
    "   ORDER BY taken.id, t.n"
    "   ON CONFLICT (project, task, model_version) DO NOTHING"
    "   RETURNING project, model_version),"
    " woken AS (SELECT pg_notify('"
    + CHANNEL
    + "', '') FROM (SELECT 1 FROM added LIMIT 1) AS some_new)"
    " SELECT g.project, g.model_version, g.given,"
    "   (SELECT count(*) FROM added a WHERE a.project = g.project"
    "   AND a.model_version = g.model_version),"
    "   (SELECT count(*) FROM woken)"
    " FROM (SELECT project, model_version, sum(cardinality(task_ids)) AS given FROM taken"
    "   GROUP BY project, model_version) AS g"
)
INBOX_IDS = "SELECT coalesce(sum(cardinality(task_ids)), 0) FROM ls_autoseg_inbox"

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

# One claim, one statement: nothing while a suspect job of this worker runs; else a due
# suspect job alone (once none of this worker's jobs runs: until then it waits), else up to
# ``limit`` due jobs, oldest first. Rows other claims hold are skipped, never waited for.
CLAIM = (
    "WITH suspect AS (SELECT id FROM ls_autoseg_jobs"
    "   WHERE state = 'queued' AND suspect AND not_before <= %(now)s"
    "   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED),"
    " due AS (SELECT id FROM ls_autoseg_jobs"
    "   WHERE state = 'queued' AND NOT suspect AND not_before <= %(now)s"
    "   AND NOT EXISTS (SELECT 1 FROM suspect)"
    "   ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE ls_autoseg_jobs SET state = 'running', attempts = attempts + 1,"
    " updated_at = %(now)s, owner = %(me)s, lease_until = %(until)s"
    " WHERE id IN (SELECT id FROM suspect WHERE NOT EXISTS (SELECT 1 FROM ls_autoseg_jobs"
    "   WHERE state = 'running' AND owner = %(me)s) UNION ALL SELECT id FROM due)"
    " AND NOT EXISTS (SELECT 1 FROM ls_autoseg_jobs"
    "   WHERE state = 'running' AND owner = %(me)s AND suspect)"
    f" RETURNING {COLUMNS}"
)

# A lease that ran out stays out, taken over or not: the worker that let it lapse (frozen,
# cut off) drops the job at its next check (``CONFIRM``), and another claim takes it back.
RENEW = (
    "UPDATE ls_autoseg_jobs SET lease_until = %(until)s"
    " WHERE id = ANY(%(held)s) AND state = 'running' AND owner = %(me)s"
    " AND lease_until >= %(now)s"
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

# Whose turn a periodic pass ``name`` is: the advisory lock makes the check and the record
# one step across instances (one that finds it held lets this turn go to the holder).
TAKE_TURN = (
    "INSERT INTO ls_autoseg_turns (name, last_at) SELECT %(name)s, %(now)s"
    " WHERE pg_try_advisory_xact_lock(%(lock)s, hashtext(%(name)s))"
    " ON CONFLICT (name) DO UPDATE SET last_at = EXCLUDED.last_at"
    " WHERE ls_autoseg_turns.last_at <= EXCLUDED.last_at - %(gap)s RETURNING name"
)
