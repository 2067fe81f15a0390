"""Per-key token buckets for run starts: a burst, then a steady rate, with bounded memory.

A run start is the expensive call behind the gateway (it starts agent work
that costs real money), so one principal must not be able to flood the
coordinator with them. Each key (a token subject, or the client address for
the anonymous principal) owns a bucket of `burst` tokens refilled at
`per_second`; a run start takes one token or is refused with the seconds until
the next token, which becomes the `Retry-After` of the 429.

    limiter = RateLimiter(per_second=2, burst=10, clock=SystemClock())
    wait = limiter.take("alice")
    if wait:                       # refused: retry in `wait` seconds
        ...

Memory: a bucket that has been idle long enough to refill completely is
identical to a new one, so it is forgotten without changing any answer. Keys
are kept in least-recently-used order, so those are always at the front and a
sweep only looks at what it drops. A hard cap (`max_keys`) bounds memory even
when more distinct keys are active than it holds; the least recently used
bucket is then dropped early, which can only let that key through sooner,
never refuse anyone wrongly.
"""

from __future__ import annotations

import math

from ..util.boundedcache import BoundedCache
from ..util.clock import Clock

DEFAULT_MAX_KEYS = 100_000
# Each take() drops at most this many forgotten keys, so one call never pays for a big sweep.
_SWEEP_PER_TAKE = 8


class RateLimiter:
    def __init__(self, *, per_second: float, burst: int, clock: Clock, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if not per_second > 0 or not math.isfinite(per_second):
            raise ValueError("per_second must be a positive finite number")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.per_second = float(per_second)
        self.burst = int(burst)
        self.max_keys = max_keys
        self._clock = clock
        # Seconds after which an untouched bucket is full again, i.e. indistinguishable from a new one.
        self._refill_s = self.burst / self.per_second
        # key -> (tokens at `stamp`, stamp); the least recently used first, so the first is the oldest.
        self._buckets: BoundedCache[str, tuple[float, float]] = BoundedCache(max_keys)
        self.refused = 0
        self.evicted = 0  # dropped by the hard cap before they were full again

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Takes one token for `key`: 0.0 when allowed, else the seconds until one is available (> 0)."""
        now = self._clock.monotonic()
        self._sweep(now)
        buckets = self._buckets
        state = buckets.get(key)
        if state is None:
            tokens = float(self.burst)
        else:
            tokens, stamp = state
            tokens = min(float(self.burst), tokens + (now - stamp) * self.per_second)
        allowed = tokens >= 1.0
        if buckets.put(key, (tokens - 1.0 if allowed else tokens, now)):
            self.evicted += 1
        if allowed:
            return 0.0
        self.refused += 1
        return (1.0 - tokens) / self.per_second

    def retry_after(self, wait_s: float) -> str:
        """`Retry-After` is whole seconds (RFC 9110 10.2.3); rounding up never invites an early retry."""
        return str(max(1, math.ceil(wait_s)))

    def _sweep(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(_SWEEP_PER_TAKE):
            oldest = buckets.oldest()
            if oldest is None or now - oldest[1][1] < self._refill_s:
                return  # the oldest is still refilling, so is everything after it
            buckets.pop(oldest[0])
