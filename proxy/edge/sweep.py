"""The periodic deadline sweep: one timer per owner instead of one per request, and one that cannot die.

Both the listener (header, body, keep-alive and send timeouts) and the
coordinator pool (response deadlines) keep their timeouts this way. Expiring
an item routinely removes it from the collection being swept, and any item's
expiry may fail; so the sweep re-arms itself before doing any work, works on
a snapshot of what is due, expires each item on its own, and logs a failure at
most once per `log_interval_s` (a bug hit on every pass must not flood the log).

    sweep = DeadlineSweep("listener", 0.25, due=lambda now: [...], expire=lambda conn, now: conn.expire(now))
    sweep.start(loop)
    ...
    sweep.stop()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("proxy.edge.sweep")

T = TypeVar("T")

LOG_INTERVAL_S = 10.0


class DeadlineSweep(Generic[T]):
    """Every `interval_s`, calls `expire(item, now)` for each item of `due(now)`.

    `due` must return a list built before any item is expired (a snapshot): expiring an item may
    add to or remove from whatever the owner keeps its items in."""

    def __init__(self, name: str, interval_s: float, *, due: Callable[[float], Sequence[T]],
                 expire: Callable[[T, float], None], log_interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] | None = None) -> None:
        self.name = name
        self.interval_s = interval_s
        self._due = due
        self._expire = expire
        self._log_interval = log_interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock                # the loop's time unless given: whatever the owner's deadlines use
        self._handle: asyncio.TimerHandle | None = None
        self._last_logged: float | None = None
        self.failures = 0            # passes or items that raised, for tests and diagnosis
        self.started = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.started:
            return
        self.started = True
        self._loop = loop
        if self._clock is None:
            self._clock = loop.time
        self._handle = loop.call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        self.started = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        # Re-armed first: whatever happens below, the next pass is already scheduled.
        self._handle = loop.call_later(self.interval_s, self._tick)
        assert self._clock is not None
        self.run(self._clock())

    def run(self, now: float) -> None:
        """One pass: expires each item due at `now`, each on its own."""
        try:
            due = self._due(now)
        except Exception:
            self._failed(now)
            return
        for item in due:
            try:
                self._expire(item, now)
            except Exception:
                self._failed(now)

    def _failed(self, now: float) -> None:
        self.failures += 1
        if self._last_logged is None or now - self._last_logged >= self._log_interval:
            self._last_logged = now
            log.exception("deadline sweep failed", extra={"event": "sweep_failed", "sweep": self.name,
                                                         "failures": self.failures})
