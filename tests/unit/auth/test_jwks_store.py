"""proxy/auth/jwks_store.py alone: keys by kid, expiry, staleness and readiness on a FakeClock; no network."""

from __future__ import annotations

import pytest
from joserfc.jwk import OctKey

from proxy.util.clock import FakeClock
from proxy.settings.config import AuthConfig, IssuerConfig
from proxy.auth.jwks_store import IssuerKeys, JwksStore, StoreSettings
from tests.support.keys import AUDIENCE, signer

ISSUER = "http://127.0.0.1:1/a"
SETTINGS = StoreSettings(max_stale_s=600)


def imported(*names: str, kid_less: bool = False) -> dict:
    """What the fetcher hands the store: kid -> (JWK, imported key)."""
    out = {}
    for name in names:
        s = signer(name)
        out[None if kid_less else name] = (s.jwk(), s.key)
    return out


def keys_for(clock: FakeClock, **issuer: object) -> IssuerKeys:
    return IssuerKeys(IssuerConfig(issuer=ISSUER, audiences=(AUDIENCE,), **issuer), SETTINGS, clock)


def test_settings_take_only_the_store_slice_of_auth() -> None:
    assert StoreSettings.from_auth(AuthConfig(jwks_max_stale_s=123, jwks_cache_ttl_s=7)) == StoreSettings(123)


def test_set_keys_then_find_by_kid(clock: FakeClock) -> None:
    keys = keys_for(clock)
    assert not keys.ready and keys.find_key("k1") is None and keys.keys_count == 0 and keys.last_success is None
    keys.set_keys(imported("k1", "k2"), ttl_s=100)
    assert keys.ready and keys.keys_count == 2 and keys.has_kid("k2") and not keys.has_kid("k3")
    assert keys.find_key("k1") is signer("k1").key
    assert keys.find_key(None) is None                   # two keys: a kid-less token cannot choose
    assert keys.last_success == clock.time()


def test_a_sole_key_serves_tokens_without_kid(clock: FakeClock) -> None:
    keys = keys_for(clock)
    keys.set_keys(imported("k1"), ttl_s=100)
    assert keys.find_key(None) is signer("k1").key
    keys.set_keys(imported("k2", kid_less=True), ttl_s=100)
    assert keys.find_key(None) is signer("k2").key and keys.find_key("k1") is None


def test_expiry_after_the_ttl_and_unusable_after_max_stale(clock: FakeClock) -> None:
    keys = keys_for(clock)
    assert keys.is_expired()                            # nothing fetched yet
    keys.set_keys(imported("k1"), ttl_s=100)
    clock.advance(99)
    assert not keys.is_expired()
    clock.advance(1)
    assert keys.is_expired() and keys.ready             # due for a refetch; still served
    clock.advance(500)
    assert keys.ready                                   # exactly max_stale_s old
    clock.advance(1)
    assert not keys.ready and keys.find_key("k1") is not None  # held, but callers must not use them
    keys.set_keys(imported("k1"), ttl_s=100)
    assert keys.ready and not keys.is_expired()


def test_an_hmac_only_issuer_needs_no_fetch_and_is_always_ready(clock: FakeClock) -> None:
    keys = keys_for(clock, algorithms=("HS256",), hmac_secret="s" * 32)
    assert not keys.needs_fetch and keys.ready and not keys.is_expired()
    assert isinstance(keys.hmac_key, OctKey)
    clock.advance(10**6)
    assert keys.ready


def test_mixed_issuer_has_both_an_hmac_key_and_keys_to_fetch(clock: FakeClock) -> None:
    keys = keys_for(clock, algorithms=("RS256", "HS256"), hmac_secret="s" * 32)
    assert keys.needs_fetch and isinstance(keys.hmac_key, OctKey) and not keys.ready
    assert keys_for(clock).hmac_key is None


@pytest.mark.parametrize("lookup", [ISSUER + "/", ISSUER.upper(), "http://127.0.0.1:1/b"])
def test_store_finds_issuers_by_exact_iss(lookup: str, clock: FakeClock) -> None:
    store = JwksStore([IssuerConfig(ISSUER, (AUDIENCE,))], SETTINGS, clock)
    assert store.find_by_issuer(ISSUER) is not None and store.find_by_issuer(lookup) is None
    assert len(store) == 1 and list(store) == [store.find_by_issuer(ISSUER)]


def test_store_is_ready_when_every_issuer_is(clock: FakeClock) -> None:
    store = JwksStore([IssuerConfig(ISSUER, (AUDIENCE,)), IssuerConfig(ISSUER + "2", (AUDIENCE,))], SETTINGS, clock)
    store.find_by_issuer(ISSUER).set_keys(imported("k1"), ttl_s=100)
    assert not store.ready
    store.find_by_issuer(ISSUER + "2").set_keys(imported("k2"), ttl_s=100)
    assert store.ready
