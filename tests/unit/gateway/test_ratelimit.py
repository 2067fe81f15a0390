"""Run-start rate limiting: a burst then a steady rate per key, honest Retry-After, bounded memory."""

from __future__ import annotations

import pytest

from proxy.util.clock import FakeClock
from proxy.settings.config import ConfigError, build_config
from proxy.gateway.ratelimit import RateLimiter


def limiter(clock: FakeClock, per_second: float = 2, burst: int = 3, **options) -> RateLimiter:
    return RateLimiter(per_second=per_second, burst=burst, clock=clock, **options)


def test_burst_is_allowed_then_refused_with_the_wait_for_the_next_token(clock):
    rl = limiter(clock, per_second=2, burst=3)
    assert [rl.take("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("alice") == pytest.approx(0.5)
    assert rl.refused == 1


def test_tokens_come_back_at_the_configured_rate_and_never_above_burst(clock):
    rl = limiter(clock, per_second=2, burst=3)
    for _ in range(3):
        rl.take("alice")
    clock.advance(0.5)
    assert rl.take("alice") == 0.0          # one token refilled
    assert rl.take("alice") > 0
    clock.advance(3600)
    assert [rl.take("alice") for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert rl.take("alice") > 0             # an hour idle still gives only `burst`


def test_refused_attempts_do_not_consume_tokens(clock):
    rl = limiter(clock, per_second=1, burst=1)
    rl.take("alice")
    for _ in range(10):
        assert rl.take("alice") > 0         # hammering while refused
    clock.advance(1.0)
    assert rl.take("alice") == 0.0          # the next token still came after exactly 1 s


def test_keys_are_independent(clock):
    rl = limiter(clock, per_second=1, burst=1)
    assert rl.take("alice") == 0.0
    assert rl.take("alice") > 0
    assert rl.take("bob") == 0.0
    assert rl.take("10.0.0.7") == 0.0


def test_retry_after_is_whole_seconds_rounded_up(clock):
    rl = limiter(clock, per_second=4, burst=1)
    rl.take("k")
    wait = rl.take("k")
    assert wait == pytest.approx(0.25)
    assert rl.retry_after(wait) == "1"
    assert rl.retry_after(2.01) == "3"
    assert rl.retry_after(3.0) == "3"


def test_a_slow_rate_waits_the_full_interval(clock):
    rl = limiter(clock, per_second=0.1, burst=1)
    rl.take("k")
    assert rl.retry_after(rl.take("k")) == "10"
    clock.advance(9)
    assert rl.retry_after(rl.take("k")) == "1"


def test_idle_keys_are_forgotten_once_their_bucket_is_full_again(clock):
    rl = limiter(clock, per_second=1, burst=2)
    for i in range(1000):
        rl.take(f"client-{i}")
    assert len(rl) == 1000
    clock.advance(2.0)                       # every bucket has refilled: nothing left to remember
    for i in range(200):
        rl.take(f"later-{i}")
    assert len(rl) <= 200 + 1               # the old keys went as the new ones came
    assert not any(f"client-{i}" in rl for i in range(1000))


def test_a_key_still_refilling_is_not_forgotten(clock):
    rl = limiter(clock, per_second=1, burst=2)
    rl.take("alice")
    rl.take("alice")
    clock.advance(1.0)                       # half refilled
    for i in range(50):
        rl.take(f"other-{i}")
    assert rl.take("alice") == 0.0          # the one refilled token
    assert rl.take("alice") > 0             # and not a fresh burst


def test_the_hard_cap_bounds_memory_under_many_active_keys(clock):
    rl = limiter(clock, per_second=0.001, burst=1, max_keys=100)
    for i in range(10_000):
        rl.take(f"k{i}")
    assert len(rl) == 100
    assert rl.evicted == 9_900


@pytest.mark.parametrize("bad", [dict(per_second=0, burst=1), dict(per_second=1, burst=0),
                                 dict(per_second=float("inf"), burst=1)])
def test_nonsense_parameters_are_refused(bad, clock):
    with pytest.raises(ValueError):
        RateLimiter(clock=clock, **bad)


def test_config_key_is_off_by_default_and_parsed_when_given():
    base = {"auth": {"mode": "disabled"}}
    assert build_config(base).limits.run_start_rate is None
    cfg = build_config({**base, "limits": {"run_start_rate": {"per_second": 2.5, "burst": 10}}})
    assert (cfg.limits.run_start_rate.per_second, cfg.limits.run_start_rate.burst) == (2.5, 10)


@pytest.mark.parametrize("value, problem", [
    ({"per_second": 0, "burst": 1}, "limits.run_start_rate.per_second"),
    ({"per_second": 1, "burst": 0}, "limits.run_start_rate.burst"),
    ({"per_second": 1, "burst": 1.5}, "limits.run_start_rate.burst"),
    ({"per_second": 1}, "limits.run_start_rate.burst"),
    ({"per_second": 1, "burst": 1, "per_minute": 3}, "limits.run_start_rate.per_minute"),
    (7, "limits.run_start_rate"),
])
def test_bad_rate_config_names_the_key(value, problem):
    with pytest.raises(ConfigError) as caught:
        build_config({"auth": {"mode": "disabled"}, "limits": {"run_start_rate": value}})
    assert any(p.startswith(problem + ":") or p.startswith(problem + " ") for p in caught.value.problems), \
        caught.value.problems


def test_queue_timeout_defaults_to_one_second_and_must_be_positive():
    assert build_config({"auth": {"mode": "disabled"}}).upstream.queue_timeout_s == 1.0
    with pytest.raises(ConfigError) as caught:
        build_config({"auth": {"mode": "disabled"}, "upstream": {"queue_timeout_s": -1}})
    assert caught.value.problems[0].startswith("upstream.queue_timeout_s:")
