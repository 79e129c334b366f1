"""The HTTP connections ``serve`` accepts: uvicorn's h11 protocol with a deadline per request.

uvicorn times a connection out only between requests (``timeout_keep_alive``, and only until
the next byte arrives): a client that opens a connection and sends part of a request line,
or headers without their end, or a body slower than it announced, holds its connection open
for ever. A few hundred of them exhaust the process's file descriptors while ``/health``
stays green. Here every request must arrive whole, headers and body, within
``server.request_timeout_s`` of the connection opening or of the previous response;
otherwise the connection is closed. Label Studio sends a webhook whole in milliseconds and
gives up on it after 1 s, so the deadline only ever ends connections nobody waits on.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

log = logging.getLogger(__name__)


class DeadlineH11Protocol(H11Protocol):
    """h11 with a deadline for each request to arrive; ``request_timeout_s`` is set by
    :func:`deadline_protocol` on a subclass."""

    request_timeout_s: float = 10.0

    _deadline: asyncio.TimerHandle | None = None
    # The request cycle current when the deadline was set: still the same one when it
    # passes means no request's headers arrived meanwhile.
    _cycle_at_start: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_deadline()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._cycle_at_start = self.cycle
        self._deadline = self.loop.call_later(self.request_timeout_s, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is self._cycle_at_start:
            what = "its request's headers"
        elif cycle.more_body and not cycle.response_started:
            what = "its request's body"
        else:
            return  # the request arrived whole; the app is answering it
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        # INFO, not WARNING: one line per connection, and a flood of them is no fault of ours.
        log.info(
            "closing the connection from %s: %s did not arrive within %.0f s",
            client,
            what,
            self.request_timeout_s,
        )
        # The app, if it is reading the body, sees the client disconnect.
        self.transport.close()


def deadline_protocol(request_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with this deadline per request."""
    if not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
    return type(
        "DeadlineH11Protocol", (DeadlineH11Protocol,), {"request_timeout_s": request_timeout_s}
    )
