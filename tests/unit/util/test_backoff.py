"""proxy/util/backoff.py: full-jitter exponential backoff."""

from __future__ import annotations

import random

from proxy.util.backoff import backoff_cap, full_jitter


class UpperBound(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_cap_doubles_from_the_base_up_to_the_maximum() -> None:
    assert [backoff_cap(n, 1.0, 60.0) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert [backoff_cap(n, 0.05, 1.0) for n in (1, 2, 3, 5, 6)] == [0.05, 0.1, 0.2, 0.8, 1.0]


def test_a_long_run_of_failures_does_not_overflow() -> None:
    assert backoff_cap(10_000, 1.0, 60.0) == 60.0


def test_pause_is_uniform_between_zero_and_the_cap() -> None:
    assert full_jitter(3, 1.0, 60.0, UpperBound()) == 4.0
    rng = random.Random(7)
    pauses = [full_jitter(3, 1.0, 60.0, rng) for _ in range(200)]
    assert all(0.0 <= p <= 4.0 for p in pauses) and len(set(pauses)) > 100
    assert 0.0 <= full_jitter(1, 0.05, 1.0) <= 0.05   # the random module itself by default
