"""proxy/auth/jwks_refresh.py alone: the scheduler over a scripted fetcher, on a FakeClock, never sleeping."""

from __future__ import annotations

import asyncio

import pytest

from proxy.util.clock import FakeClock
from proxy.settings.config import AuthConfig
from proxy.auth.jwks_fetch import FetchErrorKind, JwksFetchError
from proxy.auth.jwks_refresh import RefreshSettings
from proxy.auth.jwks_store import KeysUnavailable
from tests.support.jwks import ScriptedFetcher, UpperBound, scheduler
from tests.support.keys import signer

def test_settings_take_only_the_refresh_slice_of_auth() -> None:
    settings = RefreshSettings.from_auth(AuthConfig(jwks_refetch_cooldown_s=12, jwks_cache_ttl_s=7))
    assert settings.refetch_cooldown_s == 12
    assert (settings.backoff_base_s, settings.backoff_max_s, settings.refresh_at_fraction) == (1.0, 60.0, 0.9)


async def test_a_successful_fetch_fills_the_store_and_counts(clock: FakeClock) -> None:
    results: list[tuple[str, float]] = []
    s = scheduler(clock, ScriptedFetcher(["k1"]), on_fetch=lambda r, d: results.append((r, d)))
    await s.refresh()
    assert s.keys.ready and s.keys.find_key("k1") is not None
    assert (s.fetches_ok, s.fetches_failed, s.last_error) == (1, 0, None) and results == [("ok", 0.0)]
    assert s.next_refresh_delay() == pytest.approx(90)   # 90% of the TTL
    clock.advance(90)
    assert s.next_refresh_delay() == 0


async def test_failures_keep_the_keys_and_back_off_with_full_jitter(clock: FakeClock) -> None:
    results: list[str] = []
    fetcher = ScriptedFetcher(["k1"], *[FetchErrorKind.HTTP_STATUS] * 8)
    s = scheduler(clock, fetcher, rng=UpperBound(), on_fetch=lambda r, d: results.append(r))
    await s.refresh()
    caps = []
    for _ in range(8):
        with pytest.raises(JwksFetchError):
            await s.refresh()
        caps.append(s.next_refresh_delay())
    assert caps == [1, 2, 4, 8, 16, 32, 60, 60]
    assert s.fetches_failed == 8 and s.last_error == "scripted http_status" and s.keys.find_key("k1") is not None
    assert results == ["ok"] + ["http_status"] * 8
    fetcher.script = [["k1"]]
    await s.refresh()
    assert s.next_refresh_delay() == pytest.approx(90) and s.last_error is None


async def test_unknown_kid_refetches_once_per_cooldown(clock: FakeClock) -> None:
    fetcher = ScriptedFetcher(["k1"])
    s = scheduler(clock, fetcher)
    await s.refresh()
    assert await s.refresh_for_unknown_kid("k1") is not None and fetcher.calls == 1   # known: no fetch
    assert await s.refresh_for_unknown_kid("nope") is None and fetcher.calls == 2
    assert await s.refresh_for_unknown_kid("nope") is None and fetcher.calls == 2
    assert s.refetch_suppressed == 1
    clock.advance(30)
    fetcher.script = [["k1", "k2"]]
    assert await s.refresh_for_unknown_kid("k2") is not None and fetcher.calls == 3


async def test_no_keys_at_all_is_keys_unavailable_with_a_retry_hint(clock: FakeClock) -> None:
    s = scheduler(clock, ScriptedFetcher(FetchErrorKind.CONNECTION))
    with pytest.raises(KeysUnavailable) as first:
        await s.refresh_for_unknown_kid("k1")
    assert first.value.retry_after_s == 30          # the cooldown just started
    clock.advance(20)
    with pytest.raises(KeysUnavailable) as second:
        await s.refresh_for_unknown_kid("k1")
    assert second.value.retry_after_s == 10 and s.refetch_suppressed == 1


async def test_concurrent_callers_share_one_fetch_and_a_leaver_does_not_cancel_it(clock: FakeClock) -> None:
    fetcher = ScriptedFetcher(["k1"])
    fetcher.gate = asyncio.Event()
    s = scheduler(clock, fetcher)
    leaver = asyncio.create_task(s.refresh())
    stayers = [asyncio.create_task(s.refresh_for_unknown_kid("k1")) for _ in range(100)]
    await asyncio.sleep(0.01)  # every caller waits on the one gated fetch
    leaver.cancel()
    await asyncio.sleep(0.01)  # the cancellation is delivered
    fetcher.gate.set()
    keys = await asyncio.gather(*stayers)
    assert fetcher.calls == 1 and all(k is keys[0] and k is not None for k in keys)
    assert s.refetch_suppressed == 0 and s.fetches_ok == 1


async def test_background_loop_waits_as_scheduled(clock: FakeClock) -> None:
    delays: list[float] = []
    fetcher = ScriptedFetcher(["k1"], ["k1"], FetchErrorKind.TIMEOUT, FetchErrorKind.TIMEOUT, ["k1"])

    async def sleep(delay: float) -> None:   # moves the FakeClock instead of waiting
        delays.append(delay)
        clock.advance(delay)
        if len(delays) == 6:
            raise asyncio.CancelledError

    s = scheduler(clock, fetcher, sleep=sleep, rng=UpperBound())
    with pytest.raises(asyncio.CancelledError):
        await s.run()
    assert delays == [0, pytest.approx(90), pytest.approx(90), 1, 2, pytest.approx(90)]
    assert (s.fetches_ok, s.fetches_failed) == (3, 2)


async def test_set_remote_jwks_installs_like_a_fetch(clock: FakeClock) -> None:
    fetcher = ScriptedFetcher(["unused"])
    s = scheduler(clock, fetcher)
    s.set_remote_jwks({"keys": [signer("k1").jwk()]}, ttl_s=50)
    assert s.keys.find_key("k1") is not None and s.fetches_ok == 1 and fetcher.calls == 0
    clock.advance(50)
    assert s.keys.is_expired()
    with pytest.raises(JwksFetchError):
        s.set_remote_jwks({"keys": []})


async def test_close_cancels_a_fetch_in_flight(clock: FakeClock) -> None:
    fetcher = ScriptedFetcher(["k1"])
    fetcher.gate = asyncio.Event()
    s = scheduler(clock, fetcher)
    waiter = asyncio.create_task(s.refresh())
    await asyncio.sleep(0.01)  # the fetch is in flight, held at the gate
    await s.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
