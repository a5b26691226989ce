"""Running the server under uvicorn: idle connections time out, SIGTERM drains first.

- :class:`IdleTimeoutH11Protocol` is uvicorn's h11 protocol with a deadline for the next
  request head: a connection with no request under way (just opened, or between requests)
  is closed ``timeout_keep_alive`` seconds after it went idle unless a complete request head
  has arrived by then. uvicorn alone only times out keep-alive connections after a response:
  a client that connects and sends nothing, or drips a header byte at a time, would hold its
  connection (and file descriptor) forever.
- :class:`DrainingServer` handles the first SIGTERM by turning readiness off (``/readyz``
  answers 503) while it keeps accepting and serving for ``grace_s`` seconds, long enough
  for a load balancer's readiness probe to notice; then it shuts down as uvicorn does (stop
  accepting, finish requests in flight, the app's lifespan shutdown drains the batch queue).
  A second SIGTERM, or SIGINT (Ctrl-C), skips what is left of the grace period.

Imported only by :mod:`serving.server.app` (uvicorn is imported here).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class IdleTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that stay idle (see module docstring)."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a whole request head arrived: the app handles it from here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expire(self) -> None:
        self._head_deadline = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a readiness grace period on SIGTERM (see module docstring).

    Args:
        config: the uvicorn configuration.
        on_drain: called once, on the first SIGTERM or SIGINT (turns readiness off).
        grace_s: seconds to keep serving after SIGTERM before shutting down (0: none).
    """

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None],
                 grace_s: float) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.grace_s = float(grace_s)
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = self.drain_deadline is None and not self.should_exit
        if first:
            self.on_drain()
        if first and sig == signal.SIGTERM and self.grace_s > 0:
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:  # uvicorn re-raises it after the shutdown
                captured.append(sig)
            self.drain_deadline = time.monotonic() + self.grace_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self.should_exit = True
        return await super().on_tick(counter)
