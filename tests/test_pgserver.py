"""The throwaway PostgreSQL cluster (service/local/pgserver.py), against the real server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service.errors import ServiceStartError
from service.local import pgserver


@pytest.fixture
def own_cluster(
    postgres: pgserver.LocalPostgres, tmp_path: Path
) -> Iterator[pgserver.LocalPostgres]:
    """A cluster of this test's own, to stop and kill without disturbing the session's
    (asking for ``postgres`` first skips or fails the same way when the binaries are missing)."""
    with pgserver.cluster(tmp_path) as server:
        yield server


def test_session_cluster_accepts_connections(postgres: pgserver.LocalPostgres) -> None:
    with psycopg.connect(postgres.url) as conn:
        row = conn.execute("SELECT current_user, current_setting('server_version_num')").fetchone()
    assert row is not None
    assert row[0] == "postgres"
    assert int(row[1]) >= 150000
    assert postgres.url == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"


def test_session_cluster_has_the_test_settings(postgres: pgserver.LocalPostgres) -> None:
    with psycopg.connect(postgres.url) as conn:
        fsync = conn.execute("SHOW fsync").fetchone()
        connections = conn.execute("SHOW max_connections").fetchone()
    assert fsync == ("off",)
    assert connections == (str(pgserver.MAX_CONNECTIONS),)
    assert pgserver.MAX_CONNECTIONS >= 100  # several service processes, each with a pool


def test_database_is_created_once_and_reused(postgres: pgserver.LocalPostgres) -> None:
    first = postgres.database("reused_db")
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("CREATE TABLE marker (x int)")
    second = postgres.database("reused_db")
    assert second == first
    with psycopg.connect(second) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'marker'")
        assert name == ("reused_db",)
        assert tables.fetchone() == (1,)


def test_pg_url_is_a_fresh_database_per_test(pg_url: str, postgres: pgserver.LocalPostgres) -> None:
    with psycopg.connect(pg_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)
    assert name is not None
    assert name[0] != "postgres"
    assert pg_url == f"postgresql://postgres@127.0.0.1:{postgres.port}/{name[0]}"


def test_listens_on_127_0_0_1_only(postgres: pgserver.LocalPostgres) -> None:
    with psycopg.connect(postgres.url) as conn:
        listen = conn.execute("SHOW listen_addresses").fetchone()
        sockets = conn.execute("SHOW unix_socket_directories").fetchone()
    assert listen == ("127.0.0.1",)
    assert sockets == ("",)
    # 127.0.0.2 is loopback too, so it reaches a server bound to 0.0.0.0 but not one bound
    # to 127.0.0.1 alone.
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.settimeout(2.0)
        sock.connect(("127.0.0.2", postgres.port))


@pytest.mark.parametrize(("how", "recovers"), [("stop", False), ("kill", True)])
def test_start_after_stop_or_kill_keeps_committed_rows(
    own_cluster: pgserver.LocalPostgres, how: str, recovers: bool
) -> None:
    url = own_cluster.database("kept")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO t SELECT i, 'row ' || i FROM generate_series(1, 1000) AS i")
    getattr(own_cluster, how)()
    assert not own_cluster.running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()
    getattr(own_cluster, how)()  # a second stop (or kill) is a no-op
    own_cluster.start()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, name FROM t ORDER BY id").fetchall()
    assert rows == [(i, f"row {i}") for i in range(1, 1001)]
    assert own_cluster.database("kept") == url
    # Only a crash (-m immediate) leaves WAL to replay; a clean stop checkpoints first.
    log = own_cluster.log_path.read_text()
    assert ("automatic recovery in progress" in log) is recovers


def test_remove_deletes_the_data_dir(postgres: pgserver.LocalPostgres, tmp_path: Path) -> None:
    server = pgserver.start(tmp_path)
    assert (server.data_dir / "PG_VERSION").is_file()
    server.remove()
    server.remove()  # twice is fine
    assert not server.data_dir.exists()
    assert not server.running()


def test_failed_start_says_why_from_the_log(
    postgres: pgserver.LocalPostgres, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServiceStartError, match=r"could not bind|Address already in use"):
            pgserver.start(tmp_path, port=taken.getsockname()[1]).remove()


def test_missing_binaries_name_the_package(tmp_path: Path) -> None:
    (tmp_path / "14" / "bin").mkdir(parents=True)
    (tmp_path / "14" / "bin" / "initdb").touch()  # not executable, and no pg_ctl
    with pytest.raises(ServiceStartError, match="apt-get install postgresql"):
        pgserver.find_bin_dir(tmp_path)


def test_newest_complete_bin_dir_is_found(tmp_path: Path) -> None:
    for major, names in (
        ("13", ("initdb", "pg_ctl")),
        ("16", ("initdb", "pg_ctl")),
        ("17", ("initdb",)),
    ):
        bin_dir = tmp_path / major / "bin"
        bin_dir.mkdir(parents=True)
        for name in names:
            (bin_dir / name).touch(mode=0o755)
    assert pgserver.find_bin_dir(tmp_path) == tmp_path / "16" / "bin"
