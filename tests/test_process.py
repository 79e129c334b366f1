"""``service.local.process``: waiting for a server, and the ``serve`` subprocess's start and stop,
with small stand-in commands (the real ``serve`` runs in tests/test_service_real.py)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.errors import ServiceStartError
from service.local.lsserver import free_port
from service.local.process import ServiceProcess, log_tail, wait_http


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wait_http_is_true_once_the_url_answers_200(http_url: str) -> None:
    assert wait_http(f"{http_url}/ok", 5)


def test_wait_http_is_false_when_the_time_runs_out_on_other_answers(http_url: str) -> None:
    began = time.monotonic()
    assert not wait_http(f"{http_url}/busy", 0.5, interval_s=0.05)
    assert 0.5 <= time.monotonic() - began < 3


def test_wait_http_stops_at_once_when_the_server_is_gone() -> None:
    began = time.monotonic()
    assert not wait_http(f"http://127.0.0.1:{free_port()}/", 30, alive=lambda: False)
    assert time.monotonic() - began < 1


def test_log_tail_gives_the_last_lines_or_says_there_is_no_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert log_tail(log, 3) == "line 7\nline 8\nline 9"
    assert log_tail(tmp_path / "missing.log") == "(no log)"


# Answers 200 on every path at the port it is given; on SIGTERM it exits with the code given,
# or ignores the signal ("ignore").
STAND_IN = """
import http.server, signal, sys
port, on_term = int(sys.argv[1]), sys.argv[2]
if on_term == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(on_term)))
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Answer).serve_forever()
"""


def _process(tmp_path: Path, *command: str) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(
        tmp_path / "config.yaml",
        port,
        tmp_path / "service.log",
        {},
        command=[sys.executable, "-c", *(c.replace("PORT", str(port)) for c in command)],
    )


def test_start_waits_for_ready_and_stop_returns_the_exit_code(tmp_path: Path) -> None:
    service = _process(tmp_path, STAND_IN, "PORT", "7")
    assert service.stop() is None  # never started
    service.start(timeout_s=30)
    assert service.alive()
    assert service.stop() == 7
    assert not service.alive()
    assert service.stop() == 7  # stopped already: the same code
    service.start(timeout_s=30)  # a restart appends to the same log
    service.stop()
    assert service.log.read_text().count("listening") == 2


def test_stop_kills_a_service_that_ignores_the_signal(tmp_path: Path) -> None:
    service = _process(tmp_path, STAND_IN, "PORT", "ignore")
    service.start(timeout_s=30)
    began = time.monotonic()
    assert service.stop(signal.SIGTERM, timeout_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - began < 10


def test_a_service_that_exits_at_start_raises_with_its_code_and_log(tmp_path: Path) -> None:
    service = _process(tmp_path, "print('cannot start: no model', flush=True); raise SystemExit(3)")
    with pytest.raises(ServiceStartError, match=r"exited with code 3[\s\S]*cannot start: no model"):
        service.start(timeout_s=30)
    assert not service.alive()
    assert service.stop() == 3


def test_a_service_never_ready_is_killed_and_raises(tmp_path: Path) -> None:
    service = _process(tmp_path, "import time; time.sleep(60)")
    with pytest.raises(ServiceStartError, match="was not ready within 1 s"):
        service.start(timeout_s=1)
    assert not service.alive()


def test_cli_runs_service_cli_on_the_same_config(tmp_path: Path) -> None:
    service = _process(tmp_path, "pass")
    done = service.cli("status")
    # No config file there: the CLI itself says so, about this very path.
    assert done.returncode != 0
    assert str(service.config) in done.stderr + done.stdout
