"""uvicorn's h11 protocol with a request read timeout, so slow-loris clients cannot hold connections.

uvicorn times out only idle keep-alive connections, and any byte a client sends cancels that timer:
a client that opens a connection and trickles a request head (or a declared body) one byte at a time
holds its connection, and its buffers, forever. Here every request must arrive whole, head and body,
within `read_timeout` seconds of the connection opening (or of the previous response ending on a
keep-alive connection); otherwise the connection is closed. h11's own limit on an incomplete head
(uvicorn's `h11_max_incomplete_event_size`, 16 KiB) still bounds how much such a client can send.
Once a request has arrived, generating its answer may take as long as it needs.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class TimedH11Protocol(H11Protocol):
    read_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: Optional[asyncio.TimerHandle] = None
        self._arm_read_timer()

    def _arm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_read_timer()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if getattr(self, "_read_timer", None) is not None:
            self._read_timer.cancel()
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        cycle = self.cycle
        waiting_for_head = cycle is None or cycle.response_complete
        waiting_for_body = cycle is not None and cycle.more_body and not cycle.response_started
        if self.transport.is_closing() or not (waiting_for_head or waiting_for_body):
            return  # the request arrived whole and is being served
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("closing the connection of %s: it did not send a whole request within %ss",
                    client, self.read_timeout)
        self.transport.close()


def timed_h11_protocol(read_timeout: float) -> type[TimedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with the given read timeout."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": float(read_timeout)})
