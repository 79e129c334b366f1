"""A local Label Studio for tests and ``quickstart``: installed in its own virtual environment.

Label Studio pins its own numpy/opencv/Django, so it never shares our environment. The
virtual environment is cached under ``$LS_AUTOSEG_CACHE`` (default ``~/.cache/ls-autoseg``)
and built once; a marker file written after a successful install tells a finished install
from one that was interrupted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.constants import BULK_PREDICTIONS_FLAG
from service.errors import LabelStudioServerError
from service.local.process import log_tail, wait_http

log = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"
CACHE_ENV_VAR = "LS_AUTOSEG_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "ls-autoseg")


def venv_dir(version: str = LABEL_STUDIO_VERSION) -> Path:
    return cache_dir() / f"lsvenv-{version}"


def installed_python(version: str = LABEL_STUDIO_VERSION) -> Path | None:
    """The venv's python if a complete install exists, else None."""
    venv = venv_dir(version)
    if (venv / ".ls-autoseg-installed").is_file():
        return venv / "bin" / "python"
    return None


def ensure_installed(version: str = LABEL_STUDIO_VERSION, quiet: bool = True) -> Path:
    """Install ``label-studio==version`` into the cached venv if needed; return its python."""
    venv = venv_dir(version)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(venv.parent / f".lsvenv-{version}.lock"):
        done = installed_python(version)
        if done is not None:
            return done
        if venv.exists():
            shutil.rmtree(venv)  # an interrupted install: start again
        log.info("installing label-studio==%s into %s (about a minute, once)", version, venv)
        _run([sys.executable, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, *(["-q"] if quiet else []), f"label-studio=={version}"])
        (venv / ".ls-autoseg-installed").write_text(version, encoding="utf-8")
        return venv / "bin" / "python"


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise LabelStudioServerError(f"{' '.join(command[:4])} ... failed:\n{tail}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalLabelStudio:
    """A running Label Studio process with a known user and legacy token."""

    url: str
    username: str
    password: str
    legacy_token: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(
    data_dir: Path,
    *,
    python: Path | None = None,
    port: int | None = None,
    username: str = "admin@example.com",
    password: str | None = None,
    legacy_token: str | None = None,
    timeout_s: float = 180.0,
    extra_env: Mapping[str, str] | None = None,
    bulk_predictions_flag: bool = True,
) -> LocalLabelStudio:
    """Start Label Studio on 127.0.0.1 and wait until it answers; the caller stops it.

    ``bulk_predictions_flag``: set ``constants.BULK_PREDICTIONS_FLAG`` (its cheap bulk
    prediction import), as the quickstart and the compose files do; False runs its legacy
    import, as a Label Studio started without it does."""
    python = python or ensure_installed()
    port = port or free_port()
    password = password or secrets.token_urlsafe(12)
    legacy_token = legacy_token or secrets.token_hex(20)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}
    settings = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_USER_TOKEN": legacy_token,
        # Webhooks to the service on loopback are refused without this (Label Studio >= 1.23.1).
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(data_dir),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",  # else every request builds and posts a payload
        "SENTRY_DSN": "",  # Sentry off
        "DJANGO_DB": "sqlite",
        BULK_PREDICTIONS_FLAG: "true" if bulk_predictions_flag else "false",
        # Its log is a file: unbuffered, each line is there when the request is answered.
        "PYTHONUNBUFFERED": "1",
    }
    env.update(settings)
    env.update(extra_env or {})
    log_path = data_dir / "label-studio.log"
    command = [
        str(python.parent / "label-studio"),
        "start",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-browser",
    ]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = LocalLabelStudio(
        url=f"http://127.0.0.1:{port}",
        username=username,
        password=password,
        legacy_token=legacy_token,
        data_dir=data_dir,
        process=process,
        log_path=log_path,
        env=settings,
    )
    try:
        wait_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: LocalLabelStudio, timeout_s: float) -> None:
    if wait_http(f"{server.url}/health", timeout_s, alive=server.alive, interval_s=0.5):
        return
    if not server.alive():
        raise LabelStudioServerError(
            f"Label Studio exited with code {server.process.returncode}; "
            f"last lines of {server.log_path}:\n{log_tail(server.log_path, 20)}"
        )
    raise LabelStudioServerError(
        f"Label Studio did not answer within {timeout_s:.0f} s; see {server.log_path}:\n"
        f"{log_tail(server.log_path, 20)}"
    )


def main() -> int:
    """``python -m service.local.lsserver``: install the cached Label Studio (CI warms it)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_installed())
    return 0


if __name__ == "__main__":
    sys.exit(main())
