"""Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

    pause = full_jitter(attempt, base_s=0.05, max_s=1.0)     # attempt 1, 2, 3...

The pause is uniform in [0, min(max_s, base_s * 2 ** (attempt - 1))], so many
clients retrying against a recovering server spread out instead of arriving
together. `rng` is anything with `uniform(a, b)` (the `random` module, or a
seeded `random.Random` in tests).
"""

from __future__ import annotations

import random
from typing import Protocol

# 2 ** 62 times any sensible base is past every cap; the exponent stops there so that a
# long run of failures cannot overflow the float arithmetic.
_MAX_EXPONENT = 62


class Uniform(Protocol):
    def uniform(self, a: float, b: float, /) -> float: ...


def backoff_cap(attempt: int, base_s: float, max_s: float) -> float:
    """The largest pause for `attempt` (1 for the first retry)."""
    return min(max_s, base_s * 2 ** min(max(attempt - 1, 0), _MAX_EXPONENT))


def full_jitter(attempt: int, base_s: float, max_s: float, rng: Uniform = random) -> float:
    return rng.uniform(0.0, backoff_cap(attempt, base_s, max_s))
