"""Per-key run-start limits: a burst, then a steady rate (GCRA), with bounded memory.

A run start is the expensive call behind the gateway (it starts agent work that costs real money),
so one principal must not be able to flood the coordinator with them. Each key (a token subject, a
tenant, a client, or the client address for the anonymous principal) may start `burst` runs at once
and then `per_second` more each second; a refused start learns the seconds until it would pass,
which becomes the `Retry-After` of the 429.

The algorithm is GCRA, the token bucket written as one timestamp per key: the theoretical arrival
time (TAT), when the key's bucket would be full again. A request passes when `max(TAT, now) +
interval` is at most `capacity` (= burst x interval) ahead of now, and then moves TAT there. The
arithmetic is in whole microseconds so the Redis script (`redislimit.py`), whose Lua numbers are
doubles, computes exactly the same answers: integers below 2**53 are exact in both.

    limiter = RateLimiter(per_second=2, burst=10, clock=SystemClock())
    allowed, ahead_us = limiter.decide("alice")
    if not allowed:                 # refused: retry in `ahead_us` microseconds
        ...

Memory: a key whose TAT has passed has a full bucket, identical to a new one, so it is forgotten
without changing any answer. Keys are kept in least-recently-used order and a sweep drops the
oldest while they are full. A hard cap (`max_keys`) bounds memory even when more distinct keys are
active than it holds; the least recently used key is then dropped early, which can only let that
key through sooner, never refuse anyone wrongly.
"""

from __future__ import annotations

import math

from ..util.boundedcache import BoundedCache
from ..util.clock import Clock

DEFAULT_MAX_KEYS = 100_000
# Each decision drops at most this many forgotten keys, so one call never pays for a big sweep.
_SWEEP_PER_TAKE = 8
US = 1_000_000
POLICY_NAME = "run-start"


def gcra(tat: int | None, now: int, interval: int, capacity: int) -> tuple[bool, int, int]:
    """One GCRA step in microseconds: (allowed, the key's new TAT, µs ahead of now).

    Allowed: `ahead` is how far the new TAT is ahead of now (the time until the bucket is full
    again). Refused: the TAT is unchanged and `ahead` is the wait until a request would pass.
    The Lua in redislimit.py is this function, line for line."""
    if tat is None or tat < now:
        tat = now
    new_tat = tat + interval
    over = new_tat - now - capacity
    if over > 0:
        return False, tat, over
    return True, new_tat, new_tat - now


class Policy:
    """A limit's numbers in whole microseconds, and the RateLimit header fields that describe it
    (draft-ietf-httpapi-ratelimit-headers)."""

    __slots__ = ("per_second", "burst", "interval", "capacity", "policy_header")

    def __init__(self, *, per_second: float, burst: int) -> None:
        if not per_second > 0 or not math.isfinite(per_second):
            raise ValueError("per_second must be a positive finite number")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.per_second = float(per_second)
        self.burst = int(burst)
        # A whole number of µs between two run starts; at least 1, so any finite rate has a limit.
        self.interval = max(1, round(US / self.per_second))
        self.capacity = self.burst * self.interval
        # The quota is the burst over the time it takes to refill it whole.
        window = max(1, math.ceil(self.capacity / US))
        self.policy_header = ("RateLimit-Policy", f'"{POLICY_NAME}";q={self.burst};w={window}')

    def headers(self, allowed: bool, ahead: int) -> tuple[tuple[str, str], ...]:
        """RateLimit-Policy and RateLimit for a decision. `r` is the run starts left now; `t` is
        the seconds until the quota is whole again, or for a refusal until the next one, which
        is the Retry-After."""
        if allowed:
            remaining = (self.capacity - ahead) // self.interval
            reset = math.ceil(ahead / US)
        else:
            remaining = 0
            reset = retry_after_s(ahead)
        return self.policy_header, ("RateLimit", f'"{POLICY_NAME}";r={remaining};t={reset}')


def retry_after_s(wait_us: int) -> int:
    """`Retry-After` is whole seconds (RFC 9110 10.2.3); rounding up never invites an early retry."""
    return max(1, -(-wait_us // US))


class RateLimiter:
    """GCRA per key in this process."""

    def __init__(self, *, per_second: float, burst: int, clock: Clock, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.policy = Policy(per_second=per_second, burst=burst)
        self.max_keys = max_keys
        self._clock = clock
        # key -> TAT in µs; the least recently used first.
        self._tats: BoundedCache[str, int] = BoundedCache(max_keys)
        self.refused = 0
        self.evicted = 0  # dropped by the hard cap before they were full again

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, key: str) -> bool:
        return key in self._tats

    def now_us(self) -> int:
        return int(self._clock.monotonic() * US)

    def decide(self, key: str, now: int | None = None) -> tuple[bool, int]:
        """(allowed, µs): allowed with the µs until the key's bucket is full again, or refused with
        the µs until a run start would pass. `now` (µs) is for tests that drive time themselves."""
        if now is None:
            now = self.now_us()
        self._sweep(now)
        policy = self.policy
        tats = self._tats
        allowed, tat, ahead = gcra(tats.get(key), now, policy.interval, policy.capacity)
        if allowed:
            if tats.put(key, tat):
                self.evicted += 1
        else:
            tats.get(key)  # a refused key was just used: keep it at the recent end
            self.refused += 1
        return allowed, ahead

    def take(self, key: str) -> float:
        """0.0 when allowed, else the seconds until a run start for `key` would pass (> 0)."""
        allowed, ahead = self.decide(key)
        return 0.0 if allowed else ahead / US

    def retry_after(self, wait_s: float) -> str:
        return str(retry_after_s(math.ceil(wait_s * US)))

    def _sweep(self, now: int) -> None:
        tats = self._tats
        for _ in range(_SWEEP_PER_TAKE):
            oldest = tats.oldest()
            if oldest is None or oldest[1] > now:
                return  # the oldest is still refilling: stop, the next decision looks again
            tats.pop(oldest[0])
