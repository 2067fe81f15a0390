"""What may be tried again, and how long to pause first: the one retry policy of the way to the
coordinator, used by the exchange on callbacks and by the one in a task alike.

A refused connection is retried for any method (the request never left); a reset, or a
502/503/504 answer, only for GET, so a run is never started twice. A shed request (PoolBusy)
and a timeout are never retried: a retry would only queue or wait again.

    policy = RetryPolicy(cfg.upstream.retries)
    policy.after_error("POST", exc, attempt)       # True: try again
    policy.after_status("GET", 503, attempt)
    await asyncio.sleep(policy.pause(retry))
"""

from __future__ import annotations

from ..settings.config import RetryConfig
from ..util.backoff import full_jitter
from .pool import PoolBusy, UpstreamError

RETRYABLE_STATUSES = frozenset({502, 503, 504})


class RetryPolicy:
    __slots__ = ("attempts", "_initial", "_max")

    def __init__(self, cfg: RetryConfig) -> None:
        self.attempts = cfg.attempts
        self._initial = cfg.backoff_initial_s
        self._max = cfg.backoff_max_s

    def after_error(self, method: str, error: BaseException, attempt: int) -> bool:
        """Whether attempt number `attempt`, which failed with `error`, is followed by another."""
        return (attempt < self.attempts and isinstance(error, UpstreamError) and not isinstance(error, PoolBusy)
                and (method == "GET" or not error.sent))

    def after_status(self, method: str, status: int, attempt: int) -> bool:
        """Whether attempt number `attempt`, answered with `status`, is followed by another."""
        return method == "GET" and status in RETRYABLE_STATUSES and attempt < self.attempts

    def pause(self, retry: int) -> float:
        """Full-jitter exponential backoff before retry number `retry`."""
        return full_jitter(retry, self._initial, self._max)
