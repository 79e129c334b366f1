"""Fixtures for tests against a real PostgreSQL (a pytest plugin: see ``pytest_plugins`` in
tests/conftest.py). One throwaway cluster per session; each test gets its own database::

    def test_x(pg_url):
        with psycopg.connect(pg_url) as conn: ...

Without the server binaries the fixtures skip, except on CI (``CI`` set), where ``.ci/run``
installs them and a missing binary is a failure, not a silent skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from service.errors import ServiceStartError
from service.local import pgserver


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pgserver.LocalPostgres]:
    """A local PostgreSQL cluster for the whole session (trust auth, 127.0.0.1, fsync off);
    removed at the end."""
    try:
        pgserver.find_bin_dir()
    except ServiceStartError as exc:
        if not os.environ.get("CI"):
            pytest.skip(str(exc))
        raise
    server = pgserver.start(tmp_path_factory.mktemp("pg"))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres: pgserver.LocalPostgres) -> str:
    """The URL of a database of this test's own, in the session's cluster."""
    return postgres.database(f"test_{uuid.uuid4().hex[:16]}")
