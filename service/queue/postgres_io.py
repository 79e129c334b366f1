"""How the PostgreSQL queue talks to its server, apart from its logic in ``postgres.py``: the
event loop it runs psycopg's async API on, how errors read, and the LISTEN connection.

The ``JobQueue`` protocol is synchronous (its callers run it in threads, as SQLite's driver
needs); psycopg's async pool and the listener want a loop that is always there, so each queue
runs one in a daemon thread (``LoopThread``) and its methods wait for coroutines run there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import psycopg
import psycopg_pool
from psycopg import sql

from service.config.settings import queue_url_problem
from service.errors import ConfigError, RetryableError

log = logging.getLogger(__name__)

T = TypeVar("T")

APPLICATION_NAME = "ls-autoseg"  # as pg_stat_activity shows our connections
CONNECT_TIMEOUT_S = 5  # one connection attempt (libpq takes whole seconds)
CALL_TIMEOUT_S = 30.0  # one queue call, waiting for a pooled connection included
# How long a call waits for a pooled connection: while the server is away, calls fail this
# soon (the webhook answers 503 at once) instead of piling up in the threads that run them.
POOL_WAIT_S = 3.0
CHECK_IDLE_S = 1.0  # a pooled connection idle longer than this is checked before use
# libpq's own: a connection whose peer vanished without a word (a cut network) is found dead
# within ~20 s instead of the kernel's two hours; keeps a frozen query from holding a lease.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 2
IDLE_IN_TX_MS = 30_000
LOCK_TIMEOUT_MS = 5_000
CONNECTION_KWARGS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "application_name": APPLICATION_NAME,
    "keepalives": 1,
    "keepalives_idle": KEEPALIVE_IDLE_S,
    "keepalives_interval": KEEPALIVE_INTERVAL_S,
    "keepalives_count": KEEPALIVE_COUNT,
    "tcp_user_timeout": 20000,
}
LISTEN_RETRY_S = (0.5, 10.0)  # the listener's reconnect backoff: first, longest


def check_url(url: str) -> None:
    """A ``ConfigError`` for a URL libpq cannot read (a bad percent-encoding, an unknown
    query parameter), naming no part of it: its password may be what is malformed."""
    problem = queue_url_problem(url)
    if problem:  # not libpq's message: it holds the URL
        raise ConfigError(f"queue.url {problem}")


def public_url(url: str) -> str:
    """``url`` without its password or options, for messages, logs and ``status``."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the PostgreSQL server of queue.url"
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname', '')}"


class LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits for it.

    Never call ``call`` from that loop's own thread (it would wait for itself)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def reraise(exc: BaseException, where: str, action: str) -> NoReturn:
    """Raise ``exc`` as the project's error: what the operator must fix is a ``ConfigError``,
    a server away, restarting or slow a ``RetryableError``; anything else (a bug) as is."""
    refused = _refused_connect(exc)
    if refused == "login" or isinstance(
        exc, psycopg.errors.InvalidPassword | psycopg.errors.InvalidAuthorizationSpecification
    ):
        raise ConfigError(f"{where} refused the login ({action}): check queue.url") from exc
    if refused == "database" or isinstance(exc, psycopg.errors.InvalidCatalogName):
        raise ConfigError(f"{where}: no such database ({action}); create it first") from exc
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        raise ConfigError(f"{where}: not allowed ({action}): {exc}") from exc
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        # A standby (a failover under way): writes come back with the new primary.
        raise RetryableError(f"{where} takes no writes now ({action}): {exc}") from exc
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        raise RetryableError(f"{where} is unreachable ({action}): {exc}") from exc
    if isinstance(exc, psycopg_pool.PoolTimeout):
        raise RetryableError(
            f"{where} gave no connection within {POOL_WAIT_S:.0f} s ({action}): unreachable,"
            " or every connection busy"
        ) from exc
    if isinstance(exc, TimeoutError):
        raise RetryableError(
            f"{where} did not answer within {CALL_TIMEOUT_S:.0f} s ({action})"
        ) from exc
    raise exc


def _refused_connect(exc: BaseException) -> str | None:
    """ "login" or "database" for a connection the server refused for good, else None.

    libpq reports a failed connect as an ``OperationalError`` without a SQLSTATE, the
    server's FATAL only in the message: these are its words (they name no password)."""
    if not isinstance(exc, psycopg.OperationalError) or exc.sqlstate is not None:
        return None
    text = str(exc)
    if "password authentication failed" in text or "no pg_hba.conf entry" in text:
        return "login"
    if 'role "' in text and "does not exist" in text:
        return "login"
    if 'database "' in text and "does not exist" in text:
        return "database"
    return None


def make_pool(
    url: str, max_size: int, used: dict[int, float]
) -> psycopg_pool.AsyncConnectionPool[Any]:
    """The queue's pool, not opened yet, of autocommit connections: each one idle for a while
    is checked as it is handed out (a server restart leaves broken ones behind; one in use
    a moment ago is not asked again, a check costing a fifth of a claim), a failed reconnect
    giving its slot up soon (demand grows the pool again once the server is back). ``used``:
    id(connection) -> when a call last used it (monotonic), kept by the caller."""

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # The server's side of a client that froze or vanished inside a transaction: its
        # locks go after this long instead of staying while the session does (a cut network:
        # the kernel's two hours). SET, not a startup option: PgBouncer refuses those.
        await conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TX_MS}")
        await conn.execute(f"SET tcp_keepalives_idle = {KEEPALIVE_IDLE_S}")
        await conn.execute(f"SET tcp_keepalives_interval = {KEEPALIVE_INTERVAL_S}")
        await conn.execute(f"SET tcp_keepalives_count = {KEEPALIVE_COUNT}")
        # A process frozen with a statement sent but its pipeline not yet synced holds its
        # row locks, "active", for as long as it is frozen: nothing waits on them longer.
        await conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        if time.monotonic() - used.get(id(conn), -math.inf) > CHECK_IDLE_S:
            await psycopg_pool.AsyncConnectionPool.check_connection(conn)

    return psycopg_pool.AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs={**CONNECTION_KWARGS, "autocommit": True},
        configure=configure,
        check=check,
        timeout=POOL_WAIT_S,
        reconnect_timeout=CONNECT_TIMEOUT_S * 2,
        name="ls-autoseg queue",
    )


async def connect(url: str, *, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, **CONNECTION_KWARGS)


async def listen(url: str, channel: str, notify: Callable[[], None], where: str) -> None:
    """LISTEN on ``channel`` on a connection of its own and call ``notify`` for each NOTIFY,
    until cancelled. After a loss it reconnects with backoff and calls ``notify`` once (one
    may have been missed meanwhile)."""
    delay = LISTEN_RETRY_S[0]
    lost = False
    while True:
        try:
            async with await connect(url, autocommit=True) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                if lost:
                    log.info("listening to %s again", where)
                    notify()
                delay, lost = LISTEN_RETRY_S[0], False
                async for _ in conn.notifies():
                    notify()
        except psycopg.Error as exc:
            if not lost:
                log.warning("cannot listen to %s (workers poll meanwhile): %s", where, exc)
            lost = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, LISTEN_RETRY_S[1])
