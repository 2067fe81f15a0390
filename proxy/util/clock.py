"""Time as a dependency: caches, TTLs and cooldowns read it here so tests can move it.

    clock = SystemClock()
    deadline = clock.monotonic() + ttl      # for intervals
    now = clock.time()                      # for JWT exp/nbf/iat
"""

from __future__ import annotations

import time as _time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (JWT numeric dates)."""

    def monotonic(self) -> float:
        """Seconds that never go backwards (TTLs, cooldowns, backoff)."""


class SystemClock:
    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)


class FakeClock:
    """A clock that moves only when told to; for tests of expiry and cooldowns."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds
