"""proxy/gateway/streamlimit.py: open event streams per principal (end to end: tests/e2e/gateway/test_stream_limits.py)."""

from __future__ import annotations

import pytest

from proxy.gateway.streamlimit import StreamLimiter


def test_the_limiter_counts_per_key_and_forgets_a_key_at_zero():
    limiter = StreamLimiter(limit=2)
    a, b, c = object(), object(), object()
    assert limiter.enter(a, "alice") and limiter.enter(b, "alice")
    assert not limiter.enter(c, "alice") and limiter.refused == 1
    assert limiter.enter(c, "bob")
    limiter.leave(a)
    limiter.leave(a)  # a request's end reported twice counts once
    assert limiter.open("alice") == 1
    limiter.leave(b)
    limiter.leave(c)
    assert len(limiter) == 0 and limiter.open("alice") == 0 and limiter._open == {}


def test_a_refused_request_holds_nothing_and_leaving_it_frees_nothing():
    limiter = StreamLimiter(limit=1)
    held, refused = object(), object()
    assert limiter.enter(held, "alice") and not limiter.enter(refused, "alice")
    limiter.leave(refused)  # its end is still reported: it must not free the slot it never had
    assert limiter.open("alice") == 1 and not limiter.enter(object(), "alice")


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit: int):
    with pytest.raises(ValueError):
        StreamLimiter(limit=limit)
