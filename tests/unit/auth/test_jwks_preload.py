"""RefreshScheduler.set_remote_jwks: installing a key set without a fetch, as a fetch would."""

import pytest

from proxy.util.clock import FakeClock
from proxy.settings.config import build_config
from proxy.auth.jwks_fetch import JwksFetchError
from proxy.auth.jwks_refresh import JwksRegistry
from tests.support.keys import signer

ISSUER = "http://127.0.0.1:1/idp"


def registry(clock: FakeClock) -> JwksRegistry:
    cfg = build_config({"auth": {"mode": "required", "jwks_cache_ttl_s": 100, "issuers": [
        {"issuer": ISSUER, "audiences": ["a"], "jwks_uri": ISSUER + "/jwks"}]}})
    return JwksRegistry(cfg.auth, clock)


def test_preloaded_keys_serve_and_expire_like_fetched_ones(clock):
    reg = registry(clock)
    jwks = reg.find_by_issuer(ISSUER)
    assert not jwks.ready and jwks.find_key("k1") is None
    reg.refresher(ISSUER).set_remote_jwks({"keys": [signer("k1").jwk()]})
    assert jwks.ready and jwks.find_key("k1") is not None and jwks.keys_count == 1
    assert not jwks.is_expired()
    clock.advance(101)
    assert jwks.is_expired() and jwks.ready      # past the TTL: refetch due, keys still served
    assert reg.refresher(ISSUER).fetches_ok == 1  # counted as a fetch would be


def test_a_key_set_without_usable_keys_is_refused(clock):
    reg = registry(clock)
    with pytest.raises(JwksFetchError):
        reg.refresher(ISSUER).set_remote_jwks({"keys": []})
    assert not reg.find_by_issuer(ISSUER).ready
