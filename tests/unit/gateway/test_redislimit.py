"""The Redis run-start limiter against a real redis-server: the script gives the local limiter's
answers, keys are hash-tagged and expire when full, NOSCRIPT is survived, and a Redis that is down,
paused or refuses the password means the fallback and the breaker, never an exception.

The property test drives the script's time itself (its test-only ARGV[3]) with the exact sequence
of microsecond times the local limiter sees: spacing requests in real time could not hit the
boundaries (a request exactly when a token comes back) and would cost seconds per example."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.gateway.ratelimit import RateLimiter
from proxy.gateway.redislimit import GCRA_SCRIPT, RedisStore, SharedRateLimiter, Unavailable
from proxy.settings.models import BackendError, RedisConfig
from proxy.util.clock import FakeClock
from tests.support.process import free_port
from tests.support.redis import RedisServer, have_redis, needs_redis

pytestmark = needs_redis


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    if not have_redis():
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def store_for(url: str, clock: FakeClock, **options) -> RedisStore:
    return RedisStore(RedisConfig(url=url, **{"timeout_ms": 200, **options}), clock)


@asynccontextmanager
async def shared_limiter(url: str, clock: FakeClock, per_second: float, burst: int, on_error: BackendError,
                         **options) -> AsyncIterator[tuple[RedisStore, SharedRateLimiter]]:
    """A started store and the shared limiter over it (this rate, locally as its fallback), closed
    however the test ends."""
    store = store_for(url, clock, **options)
    await store.start()
    try:
        yield store, SharedRateLimiter(store, RateLimiter(per_second=per_second, burst=burst, clock=clock), on_error)
    finally:
        await store.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(per_second=st.floats(min_value=0.05, max_value=2.0), burst=st.integers(min_value=2, max_value=8),
       data=st.data())
def test_the_script_answers_as_the_local_limiter_for_the_same_timed_sequence(shared_redis, per_second, burst, data):
    clock = FakeClock()
    local = RateLimiter(per_second=per_second, burst=burst, clock=clock)
    policy = local.policy
    # Gaps at and around the interval hit the boundaries: a request exactly when a token comes back.
    edge = st.sampled_from([0, 1, policy.interval - 1, policy.interval, policy.interval + 1, policy.capacity])
    steps = data.draw(st.lists(st.tuples(st.one_of(edge, st.integers(0, 3_000_000)), st.integers(0, 2)),
                               min_size=1, max_size=40))
    client = shared_redis.client()
    script = client.register_script(GCRA_SCRIPT)
    run = uuid.uuid4().hex
    now = 1_000_000_000_000
    for gap, who in steps:
        now += gap
        key = f"k{who}"
        expected = local.decide(key, now=now)
        allowed, us = script(keys=[f"test:{run}:{{{key}}}"], args=[policy.interval, policy.capacity, now])
        assert (bool(allowed), us) == expected


async def test_a_key_is_hash_tagged_and_expires_when_its_bucket_is_full_again(redis_server, clock):
    async with shared_limiter(redis_server.url, clock, 2, 4, BackendError.LOCAL) as (store, shared):
        for _ in range(3):
            assert (await shared.decide("sub\x00iss\x00alice"))[:2] == ("redis", True)
    keys = redis_server.client().keys("*")
    assert len(keys) == 1
    key = keys[0].decode()
    assert re.fullmatch(r"arpgw:run_start:\{[0-9a-f]{32}\}", key)
    assert "alice" not in key                       # the subject is not written in clear
    ttl = redis_server.client().pttl(key)
    assert 1400 <= ttl <= 1500                      # three of four taken at 2/s: full again in 1.5 s


async def test_noscript_after_a_script_flush_reloads_the_script(redis_server, clock):
    async with shared_limiter(redis_server.url, clock, 1, 1, BackendError.CLOSED) as (store, shared):
        assert await shared.decide("a") == ("redis", True, 1_000_000)
        redis_server.client().script_flush()
        backend, allowed, wait = await shared.decide("a")
        assert (backend, allowed) == ("redis", False) and 0 < wait <= 1_000_000
        assert store.errors == {"timeout": 0, "connection": 0, "auth": 0, "response": 0}


async def test_a_redis_down_at_start_is_a_warning_then_the_breaker_stops_asking(clock, caplog):
    store = store_for(f"redis://127.0.0.1:{free_port()}/0", clock, breaker_failures=3, breaker_open_s=5)
    shared = SharedRateLimiter(store, RateLimiter(per_second=1, burst=2, clock=clock), BackendError.LOCAL)
    with caplog.at_level(logging.WARNING, "proxy.gateway.redislimit"):
        await store.start()                         # no exception: the fallback decides
        assert not store.up
        for _ in range(4):
            assert (await shared.decide("a"))[0] == "local"
    assert store.errors["connection"] == 3          # the start, then two: the breaker opened at three
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # one line while down
    clock.advance(5)
    with pytest.raises(Unavailable):
        await SharedRateLimiter(store, shared.local, BackendError.CLOSED).decide("a")
    assert store.errors["connection"] == 4          # one probe after breaker_open_s, which failed
    await store.close()


async def test_the_breaker_closes_once_redis_answers_again(redis_server, clock, caplog):
    async with shared_limiter(redis_server.url, clock, 1, 5, BackendError.LOCAL, breaker_failures=2, breaker_open_s=5,
                              timeout_ms=50) as (store, shared):
        redis_server.pause()
        try:
            assert [(await shared.decide("a"))[0] for _ in range(3)] == ["local"] * 3
        finally:
            redis_server.resume()
        assert store.errors["timeout"] == 2 and not store.up
        assert (await shared.decide("a"))[0] == "local"   # still open: Redis is not asked
        clock.advance(5)
        with caplog.at_level(logging.INFO, "proxy.gateway.redislimit"):
            assert (await shared.decide("a"))[0] == "redis"
        assert store.up
        assert any(r.levelno == logging.INFO and "back" in r.getMessage() for r in caplog.records)


async def test_a_password_file_opens_a_redis_with_requirepass_and_a_wrong_one_is_a_warning(tmp_path, clock,
                                                                                           caplog):
    secret = "s3cret-" + uuid.uuid4().hex
    with RedisServer(tmp_path, password=secret) as server:
        good = tmp_path / "good"
        good.write_text(secret + "\n")
        bad = tmp_path / "bad"
        bad.write_text("not-the-password\n")
        store = store_for(server.url, clock, password_file=str(good))
        await store.start()
        assert store.up
        shared = SharedRateLimiter(store, RateLimiter(per_second=1, burst=1, clock=clock), BackendError.CLOSED)
        assert (await shared.decide("a"))[:2] == ("redis", True)
        await store.close()

        wrong = store_for(server.url, clock, password_file=str(bad))
        with caplog.at_level(logging.WARNING, "proxy.gateway.redislimit"):
            await wrong.start()
        assert not wrong.up and wrong.errors["auth"] == 1
        with pytest.raises(Unavailable):
            await SharedRateLimiter(wrong, shared.local, BackendError.CLOSED).decide("a")
        await wrong.close()
        logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
        assert "not-the-password" not in logged and secret not in logged

        with pytest.raises(redis.AuthenticationError):  # the server really wants the password
            server.client().__class__(host="127.0.0.1", port=server.port).ping()


async def test_a_reply_that_is_not_the_scripts_is_a_failure_not_an_exception(redis_server, clock):
    async with shared_limiter(redis_server.url, clock, 1, 1, BackendError.LOCAL) as (store, shared):
        assert (await shared.decide("b"))[:2] == ("redis", True)   # b's command is kept, naming the script
        store.script = store.client.register_script("return 'not a decision'")  # a Redis (or proxy) gone wrong
        assert (await shared.decide("b"))[:2] == ("local", True)
        assert store.errors["response"] == 1 and not store.up


async def test_concurrent_decisions_beyond_the_pool_are_all_answered_by_redis(redis_server, clock):
    # One connection in all: the connection a decision keeps between decisions must go to the
    # decisions waiting for the pool, or they would fall back when their deadline passes.
    async with shared_limiter(redis_server.url, clock, 1000, 1000, BackendError.CLOSED, max_connections=1,
                              timeout_ms=2000) as (store, shared):
        for _ in range(3):
            answers = await asyncio.gather(*(shared.decide(f"caller-{i}") for i in range(20)))
            assert [backend for backend, _, _ in answers] == ["redis"] * 20
            assert all(allowed for _, allowed, _ in answers)
        assert store.errors == {"timeout": 0, "connection": 0, "auth": 0, "response": 0}
        clients = redis_server.client().client_list()
        assert len(clients) - 1 <= 1                # the kept connection counts against max_connections


async def test_a_restarted_redis_is_asked_again_without_a_failed_decision(redis_server, clock):
    async with shared_limiter(redis_server.url, clock, 1, 5, BackendError.CLOSED) as (store, shared):
        assert (await shared.decide("a"))[:2] == ("redis", True)
        redis_server.kill()
        redis_server.start()                        # same port, no script loaded, the old connection closed
        await asyncio.sleep(0.05)                   # the loop sees the old connection's end
        assert (await shared.decide("a"))[:2] == ("redis", True)
        assert store.errors == {"timeout": 0, "connection": 0, "auth": 0, "response": 0}


async def test_principals_stay_apart_when_their_commands_are_reused(redis_server, clock):
    async with shared_limiter(redis_server.url, clock, 0.01, 2, BackendError.CLOSED) as (store, shared):
        answers = [(await shared.decide(who))[:2] for who in ("a", "b", "a", "b", "a", "b", "c")]
        assert answers == [("redis", True), ("redis", True), ("redis", True), ("redis", True),
                           ("redis", False), ("redis", False), ("redis", True)]
