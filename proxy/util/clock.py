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


_second: list = [-1, ""]
# Each millisecond's tail made once: formatting "%03d" per call costs more than an index. The
# fraction is exact and below 1, and below 1 times 1000 stays below 1000 in binary floating point.
_MILLIS = tuple(".%03dZ" % ms for ms in range(1000))


def rfc3339_millis(now: float) -> str:
    """Epoch seconds as RFC 3339 UTC to the millisecond (`2026-12-07T00:05:01.042Z`), for log and
    audit lines; strftime runs once a second, not once a line."""
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(whole))
    return _second[1] + _MILLIS[int((now - whole) * 1000)]
