"""The JWKS registry end to end: store, fetcher and refresh scheduler against a real JWKS server.

The server is the scripted JWKS and discovery server of tests/support/keys.py (`jwks_server`), over real HTTP on loopback.
Time is a FakeClock; background loops are parked (their sleep never returns)
unless a test drives them itself. Each part alone: test_jwks_store.py,
test_jwks_fetch.py, test_jwks_refresh.py.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest
from joserfc.jwk import OctKey

from proxy.util.clock import FakeClock
from proxy.auth.jwks_fetch import FetchSettings, JwksFetcher, JwksFetchError
from proxy.auth.jwks_refresh import JwksRegistry, RefreshScheduler, RefreshSettings
from proxy.auth.jwks_store import IssuerKeys, KeysUnavailable, StoreSettings
from tests.support.keys import JwksServer, Registries, auth_config, issuer_config, park, signer


def jwks_of(registry: JwksRegistry, jwks_server: JwksServer, tenant: str) -> RefreshScheduler:
    """The refresh scheduler of one tenant; its store entry is `.keys`."""
    assert registry.find_by_issuer(jwks_server.issuer(tenant)) is not None
    return registry.refresher(jwks_server.issuer(tenant))


# --------------------------------------------------------------------------- fetching and lookup


async def test_start_fetches_every_issuer_and_finds_keys_by_kid(jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    a, b = jwks_of(registry, jwks_server, "a"), jwks_of(registry, jwks_server, "b")
    assert registry.ready and len(registry) == 2 and set(registry) == {a, b}
    assert a.keys.find_key("a-rsa") is not None and a.keys.has_kid("a-rsa")
    assert a.keys.keys_count == 1 and a.fetches_ok == 1 and a.keys.last_success is not None
    assert jwks_server.fetches("a") == jwks_server.fetches("b") == 1


async def test_keys_are_kept_per_issuer(jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    assert jwks_of(registry, jwks_server, "a").keys.find_key("b-rsa") is None
    assert jwks_of(registry, jwks_server, "b").keys.find_key("a-rsa") is None


async def test_issuer_lookup_is_exact(jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    assert registry.find_by_issuer(jwks_server.issuer("a") + "/") is None
    assert registry.find_by_issuer(jwks_server.issuer("a").upper()) is None


async def test_unchanged_keys_keep_their_identity_across_refreshes(
        jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    before = a.keys.find_key("a-rsa")
    await a.refresh()
    assert jwks_server.fetches("a") == 2
    assert a.keys.find_key("a-rsa") is before  # not re-imported; token cache entries stay valid


@pytest.mark.parametrize("mode,kind", [
    ("503", "http_status"),
    ("bad_json", "bad_json"),
    ("no_keys_list", "bad_document"),
    ("empty_keys", "no_usable_keys"),
    ("hang", "timeout"),
])
async def test_refresh_failure_keeps_last_good_keys(
        jwks_server: JwksServer, registries: Registries, clock: FakeClock, mode: str, kind: str) -> None:
    results: list[str] = []
    registry = await registries(auth_config(jwks_server, jwks_fetch_timeout_s=0.2),
                                on_fetch=lambda result, _duration: results.append(result))
    a = jwks_of(registry, jwks_server, "a")
    key = a.keys.find_key("a-rsa")
    jwks_server.mode = mode
    clock.advance(301)
    assert a.keys.is_expired()
    with pytest.raises(JwksFetchError) as err:
        await a.refresh()
    assert err.value.kind == kind
    assert a.keys.find_key("a-rsa") is key and a.keys.ready
    assert a.fetches_failed == 1 and a.last_error
    assert "ok" in results and kind in results


async def test_connection_refused_is_a_fetch_error(
        jwks_server: JwksServer, registries: Registries) -> None:
    closed = JwksServer()
    await closed.start()
    dead_uri = closed.jwks_uri("a")
    await closed.stop()
    registry = await registries(auth_config(jwks_server, issuer_config(jwks_server, "a", jwks_uri=dead_uri)))
    a = jwks_of(registry, jwks_server, "a")
    assert not a.keys.ready and a.fetches_failed == 1
    with pytest.raises(JwksFetchError) as err:
        await a.refresh()
    assert err.value.kind == "connection"


async def test_keys_staler_than_max_stale_are_unavailable(
        jwks_server: JwksServer, registries: Registries, clock: FakeClock) -> None:
    registry = await registries(auth_config(jwks_server, jwks_max_stale_s=600))
    a = jwks_of(registry, jwks_server, "a")
    jwks_server.mode = "503"
    clock.advance(600)
    assert a.keys.ready
    clock.advance(1)
    assert not a.keys.ready and not registry.ready
    with pytest.raises(KeysUnavailable) as err:
        await a.refresh_for_unknown_kid("a-rsa")
    assert err.value.retry_after_s >= 1
    jwks_server.mode = "ok"
    clock.advance(30)
    assert await a.refresh_for_unknown_kid("a-rsa") is not None and a.keys.ready


async def test_cold_start_with_idp_down_does_not_raise_then_recovers(
        jwks_server: JwksServer, registries: Registries, clock: FakeClock) -> None:
    jwks_server.mode = "503"
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    assert not registry.ready and a.keys.keys_count == 0 and a.last_error
    with pytest.raises(KeysUnavailable) as err:
        await a.refresh_for_unknown_kid("a-rsa")
    assert err.value.issuer == jwks_server.issuer("a")
    jwks_server.mode = "ok"
    with pytest.raises(KeysUnavailable) as err:
        await a.refresh_for_unknown_kid("a-rsa")  # still inside the cooldown: no fetch
    assert 1 <= err.value.retry_after_s <= 30 and a.refetch_suppressed == 1
    clock.advance(30)
    assert await a.refresh_for_unknown_kid("a-rsa") is not None and a.keys.ready
    assert not registry.ready  # issuer b has had no reason to refetch yet


async def test_default_ttl_and_refresh_at_ninety_percent(jwks_server: JwksServer, registries: Registries,
                                                          clock: FakeClock) -> None:
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    assert a.next_refresh_delay() == pytest.approx(270)
    clock.advance(299)
    assert not a.keys.is_expired()
    clock.advance(1)
    assert a.keys.is_expired() and a.next_refresh_delay() == 0


@pytest.mark.parametrize("header,ttl", [
    ("public, max-age=120", 120),
    ("max-age=5", 30),                 # clamped up to jwks_min_ttl_s
    ("max-age=999999999", 86400),      # clamped down to jwks_max_ttl_s
    ("no-store", 30),
    ("max-age=junk", 300),             # unparseable: the configured default
])
async def test_cache_control_max_age_is_honoured_and_clamped(
        jwks_server: JwksServer, registries: Registries, clock: FakeClock, header: str, ttl: float) -> None:
    jwks_server.cache_control = header
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    clock.advance(ttl - 1)
    assert not a.keys.is_expired()
    clock.advance(1)
    assert a.keys.is_expired()


async def test_discovery_resolves_and_caches_jwks_uri(
        jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server, issuer_config(jwks_server, "a", jwks_uri=None)))
    a = jwks_of(registry, jwks_server, "a")
    assert a.keys.ready and a.keys.find_key("a-rsa") is not None
    await a.refresh()
    assert jwks_server.hits["/a/.well-known/openid-configuration"] == 1
    assert jwks_server.fetches("a") == 2


async def test_discovery_issuer_mismatch_is_a_fetch_error(
        jwks_server: JwksServer, registries: Registries) -> None:
    jwks_server.discovery_issuer["a"] = jwks_server.issuer("a") + "/"
    registry = await registries(auth_config(jwks_server, issuer_config(jwks_server, "a", jwks_uri=None)))
    a = jwks_of(registry, jwks_server, "a")
    assert not a.keys.ready
    with pytest.raises(JwksFetchError) as err:
        await a.refresh()
    assert err.value.kind == "discovery"
    assert jwks_server.fetches("a") == 0


async def test_unusable_keys_are_skipped(jwks_server: JwksServer, registries: Registries) -> None:
    good = signer("a-rsa")
    private = dict(signer("leaky").key.as_dict(private=True), kid="leaky", use="sig")
    jwks_server.keys["a"] = [
        signer("enc-key").jwk(use="enc"),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
        private,
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a dict",
        signer("ops", kid="ops").jwk(key_ops=["encrypt"]),
        signer("wrong-alg").jwk(alg="RS512"),          # an alg this issuer does not accept
        signer("a-ec", "ES256", kid=None).jwk(),       # no kid while others exist
        good.jwk(),
    ]
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    assert a.keys.keys_count == 1 and a.keys.find_key("a-rsa") is not None
    for kid in ("enc-key", "hmac", "leaky", "broken", "ops", "wrong-alg"):
        assert a.keys.find_key(kid) is None, kid
    assert a.keys.find_key(None) is a.keys.find_key("a-rsa")  # the only key serves kid-less tokens


async def test_a_sole_key_without_kid_is_usable(jwks_server: JwksServer, registries: Registries) -> None:
    jwks_server.publish("a", signer("a-ec", "ES256", kid=None))
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    assert a.keys.find_key(None) is not None and a.keys.find_key("a-ec") is None


async def test_no_usable_key_is_a_fetch_error(jwks_server: JwksServer, registries: Registries) -> None:
    jwks_server.keys["a"] = [signer("enc-key").jwk(use="enc")]
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    assert not a.keys.ready
    with pytest.raises(JwksFetchError) as err:
        await a.refresh()
    assert err.value.kind == "no_usable_keys"


# --------------------------------------------------------------------------- single flight and cooldown


async def test_concurrent_refreshes_share_one_fetch(jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    await asyncio.gather(*(a.refresh() for _ in range(50)))
    assert jwks_server.fetches("a") == 2


async def test_one_cancelled_waiter_does_not_cancel_the_shared_fetch(
        jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    jwks_server.mode = "hang"
    first = asyncio.create_task(a.refresh())
    second = asyncio.create_task(a.refresh())
    await asyncio.sleep(0.05)  # both refreshes wait on the one real fetch
    first.cancel()
    await asyncio.sleep(0.05)  # the cancellation is delivered
    assert not second.done()
    jwks_server._release.set()
    jwks_server.mode = "ok"
    await second
    assert jwks_server.fetches("a") == 2


async def test_unknown_kid_refetches_at_most_once_per_cooldown(
        jwks_server: JwksServer, registries: Registries, clock: FakeClock) -> None:
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    assert await a.refresh_for_unknown_kid("nope") is None
    assert jwks_server.fetches("a") == 2
    assert await a.refresh_for_unknown_kid("nope") is None
    assert jwks_server.fetches("a") == 2 and a.refetch_suppressed == 1
    clock.advance(30)
    assert await a.refresh_for_unknown_kid("nope") is None
    assert jwks_server.fetches("a") == 3


async def test_thousand_callers_with_a_new_kid_cause_one_fetch(
        jwks_server: JwksServer, registries: Registries) -> None:
    registry = await registries(auth_config(jwks_server))
    a = jwks_of(registry, jwks_server, "a")
    jwks_server.publish("a", signer("a-rsa"), signer("a-rsa-2"))
    keys = await asyncio.gather(*(a.refresh_for_unknown_kid("a-rsa-2") for _ in range(1000)))
    assert jwks_server.fetches("a") == 2
    assert all(k is keys[0] and k is not None for k in keys)
    assert a.refetch_suppressed == 0


# --------------------------------------------------------------------------- background refresh


class _UpperBound(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


async def test_backoff_after_failures_is_exponential_and_capped(
        jwks_server: JwksServer, registries: Registries) -> None:
    jwks_server.mode = "503"
    registry = await registries(auth_config(jwks_server), rng=_UpperBound())
    a = jwks_of(registry, jwks_server, "a")
    caps = [a.next_refresh_delay()]
    for _ in range(8):
        with pytest.raises(JwksFetchError):
            await a.refresh()
        caps.append(a.next_refresh_delay())
    assert caps == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    jittered = jwks_of(await registries(auth_config(jwks_server), rng=random.Random(7)), jwks_server, "a")
    assert all(0 <= jittered.next_refresh_delay() <= 1 for _ in range(20))


async def test_background_loop_refreshes_before_ttl_and_backs_off(
        jwks_server: JwksServer, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        clock.advance(delay)
        if len(delays) == 2:
            jwks_server.mode = "503"
        if len(delays) == 4:
            raise asyncio.CancelledError

    auth = auth_config(jwks_server)
    a = RefreshScheduler(IssuerKeys(issuer_config(jwks_server, "a"), StoreSettings.from_auth(auth), clock),
                         JwksFetcher(issuer_config(jwks_server, "a"), FetchSettings.from_auth(auth), session),
                         RefreshSettings.from_auth(auth), clock, sleep=sleep, rng=_UpperBound())
    with pytest.raises(asyncio.CancelledError):
        await a.run()
    # first fetch at once, next at 90% of the TTL, then backoff 1 s, 2 s
    assert delays == [0, pytest.approx(270), 1, 2]
    assert a.fetches_ok == 1 and a.fetches_failed == 2 and a.keys.ready


async def test_registry_close_cancels_background_tasks(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                                       clock: FakeClock) -> None:
    jwks_server.mode = "503"
    registry = JwksRegistry(auth_config(jwks_server), clock, sleep=park)
    await registry.start(session)
    tasks = list(registry._tasks)
    assert len(tasks) == 2 and not any(t.done() for t in tasks)
    await registry.close()
    assert all(t.cancelled() for t in tasks)


async def test_hmac_issuer_needs_no_jwks(jwks_server: JwksServer, registries: Registries) -> None:
    hs = issuer_config(jwks_server, "h", jwks_uri=None, algorithms=("HS256",), hmac_secret="s" * 32)
    registry = await registries(auth_config(jwks_server, hs))
    h = jwks_of(registry, jwks_server, "h")
    assert h.keys.ready and not h.keys.is_expired() and isinstance(h.keys.hmac_key, OctKey)
    assert await h.refresh_for_unknown_kid("x") is None
    assert sum(jwks_server.hits.values()) == 0

