"""A throwaway PostgreSQL cluster for tests and benchmarks, from the machine's own server
binaries (Debian's ``postgresql`` package: ``/usr/lib/postgresql/<major>/bin``).

The cluster listens on one free 127.0.0.1 port with trust authentication and no unix socket,
so nothing outside this machine can reach it and no password is needed. ``initdb`` and
``pg_ctl`` refuse to run as root; as root they run as the ``postgres`` user, and the data
directory is then made outside ``base`` (pytest's temporary directories are mode 700, so that
user could not reach one inside them). Either way the data directory is ours:
``LocalPostgres.remove()`` stops the server and deletes it, and ``with cluster(base) as pg:``
does that on the way out.

``python -m service.local.pgserver`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from service.errors import ServiceStartError
from service.local.lsserver import free_port
from service.local.process import log_tail

PREFERRED_MAJOR = 15
POSTGRES_ROOT = Path("/usr/lib/postgresql")
# The OS account that owns the cluster when we are root (Debian's package creates it).
SERVER_USER = "postgres"
# Several service processes, each with a pool, share one test cluster.
MAX_CONNECTIONS = 200
LOG_NAME = "server.log"
INSTALL_HINT = "install PostgreSQL's server binaries: apt-get install postgresql"
COMMAND_TIMEOUT_S = 60.0


def find_bin_dir(root: Path = POSTGRES_ROOT) -> Path:
    """PostgreSQL 15's bin directory, else the newest one that has ``initdb`` and ``pg_ctl``."""

    def usable(bin_dir: Path) -> bool:
        return all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "pg_ctl"))

    preferred = root / str(PREFERRED_MAJOR) / "bin"
    if usable(preferred):
        return preferred
    found = [d for d in root.glob("*/bin") if d.parent.name.isdigit() and usable(d)]
    if found:
        return max(found, key=lambda d: int(d.parent.name))
    raise ServiceStartError(
        f"no PostgreSQL server binaries (initdb, pg_ctl) under {root}; {INSTALL_HINT}"
    )


@dataclass
class LocalPostgres:
    """A running local cluster; ``url`` connects as the superuser ``postgres``."""

    url: str
    port: int
    data_dir: Path
    bin_dir: Path = field(default_factory=find_bin_dir)
    # Who runs pg_ctl: None is this process's user, else the account ``runuser`` switches to.
    run_as: str | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def database(self, name: str) -> str:
        """Create database ``name`` unless it exists; return its URL."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                # Another process may make it between our look and our CREATE.
                with contextlib.suppress(pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def running(self) -> bool:
        # pg_ctl status: 0 running, 3 not running, 4 no usable data directory.
        return self._pg_ctl("status", check=False).returncode == 0

    def start(self) -> None:
        """Start it again on the same port and data directory (after ``stop`` or ``kill``);
        returns once it accepts connections, after crash recovery if ``kill`` stopped it."""
        if self.running():
            return
        result = self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_path), check=False)
        if result.returncode != 0:
            raise ServiceStartError(
                f"PostgreSQL did not start on 127.0.0.1:{self.port} ({_output(result)}); "
                f"the end of its log ({self.log_path}):\n{log_tail(self.log_path, 20)}"
            )

    def stop(self) -> None:
        """A clean shutdown (``-m fast``: sessions are cut, nothing is lost); no-op if stopped."""
        self._stop("fast")

    def kill(self) -> None:
        """A crash: ``-m immediate`` skips the shutdown checkpoint, so ``start`` recovers."""
        self._stop("immediate")

    def remove(self) -> None:
        """Stop it for good and delete its data directory."""
        if self.data_dir.exists():
            self._stop("fast")
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _stop(self, mode: str) -> None:
        if not self.running():
            return
        result = self._pg_ctl("stop", "-w", "-t", "60", "-m", mode, check=False)
        if result.returncode != 0 and self.running():
            raise ServiceStartError(f"pg_ctl stop -m {mode} failed: {_output(result)}")

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return _run(command, self.run_as, check=check)


def start(base: Path, *, fsync: bool = False, port: int | None = None) -> LocalPostgres:
    """``initdb`` a new cluster and start it on a free 127.0.0.1 port (or ``port``); returns
    once it accepts connections (about a second). ``fsync=False`` (the default, for tests)
    trades durability across an OS crash for speed; a killed server still recovers. The
    caller calls ``remove()``, or ``stop()`` to keep the data."""
    bin_dir = find_bin_dir()
    run_as = SERVER_USER if os.geteuid() == 0 else None
    data_dir = _make_data_dir(base, run_as)
    try:
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",  # the C locale: the same on every machine, whatever LANG says
                "--no-sync",  # a throwaway cluster: not worth waiting for the disk
                "--no-instructions",
            ],
            run_as,
        )
        port = port or free_port()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            # No unix socket: its path would have to fit in 107 bytes, and TCP is what we test.
            "unix_socket_directories": "''",
            "max_connections": str(MAX_CONNECTIONS),
            "fsync": "on" if fsync else "off",
        }
        with (data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# ls-autoseg local cluster (service/local/pgserver.py)\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        server = LocalPostgres(
            url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
            port=port,
            data_dir=data_dir,
            bin_dir=bin_dir,
            run_as=run_as,
        )
        server.start()
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return server


@contextlib.contextmanager
def cluster(base: Path, *, fsync: bool = False) -> Iterator[LocalPostgres]:
    """``start``, and ``remove`` on the way out of the ``with`` block."""
    server = start(base, fsync=fsync)
    try:
        yield server
    finally:
        server.remove()


def _make_data_dir(base: Path, run_as: str | None) -> Path:
    if run_as is None:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="pg-", dir=base))
    try:
        uid, gid = _ids(run_as)
    except KeyError:
        raise ServiceStartError(
            f"running as root, so PostgreSQL must run as the user {run_as!r}, who does not "
            f"exist; {INSTALL_HINT} (it creates that user)"
        ) from None
    # mkdtemp makes it mode 700; only the server's user needs to get in.
    data_dir = Path(tempfile.mkdtemp(prefix="ls-autoseg-pg-"))
    os.chown(data_dir, uid, gid)
    return data_dir


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _run(
    command: list[str], run_as: str | None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if run_as is not None:
        command = ["runuser", "-u", run_as, "--", *command]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            # The caller's directory may be closed to the server's user; initdb would warn.
            cwd="/",
            timeout=COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceStartError(f"{' '.join(command[:5])} ... failed: {exc}") from exc
    if check and result.returncode != 0:
        raise ServiceStartError(f"{' '.join(command[:5])} ... failed: {_output(result)}")
    return result


def _output(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    return "\n".join(lines[-15:]) or f"exit code {result.returncode}"


def main() -> int:
    """``python -m service.local.pgserver``: a cluster to try several instances against."""
    # A SIGTERM ends it as Ctrl-C does: through ``cluster``'s cleanup, not around it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with cluster(Path(tempfile.gettempdir()) / "ls-autoseg-pg", fsync=True) as server:
        print(server.url, flush=True)
        print("Ctrl-C stops it and deletes its data", file=sys.stderr, flush=True)
        try:
            while server.running():
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
