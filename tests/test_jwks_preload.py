"""IssuerJwks.set_remote_jwks: installing a key set without a fetch, as a fetch would."""

import pytest
from joserfc.jwk import RSAKey

from proxy.clock import FakeClock
from proxy.config import build_config
from proxy.jwks import JwksFetchError, JwksRegistry

ISSUER = "http://127.0.0.1:1/idp"


def registry(clock: FakeClock) -> JwksRegistry:
    cfg = build_config({"auth": {"mode": "required", "jwks_cache_ttl_s": 100, "issuers": [
        {"issuer": ISSUER, "audiences": ["a"], "jwks_uri": ISSUER + "/jwks"}]}})
    return JwksRegistry(cfg.auth, clock)


def test_preloaded_keys_serve_and_expire_like_fetched_ones():
    clock = FakeClock()
    jwks = registry(clock).find_by_issuer(ISSUER)
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    assert not jwks.ready and jwks.find_key("k1") is None
    jwks.set_remote_jwks({"keys": [key.as_dict(private=False)]})
    assert jwks.ready and jwks.find_key("k1") is not None and jwks.keys_count == 1
    assert not jwks.is_expired()
    clock.advance(101)
    assert jwks.is_expired() and jwks.ready      # past the TTL: refetch due, keys still served


def test_a_key_set_without_usable_keys_is_refused():
    jwks = registry(FakeClock()).find_by_issuer(ISSUER)
    with pytest.raises(JwksFetchError):
        jwks.set_remote_jwks({"keys": []})
    assert not jwks.ready
