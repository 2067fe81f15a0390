"""proxy/auth/jwks_fetch.py alone: one fetch, parsing and importing keys, and typed errors."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.settings.config import AuthConfig
from proxy.auth.jwks_fetch import FetchErrorKind, FetchSettings, JwksFetcher, JwksFetchError
from tests.support.keys import JwksServer, issuer_config, signer

SETTINGS = FetchSettings(timeout_s=1.0, default_ttl_s=300.0, min_ttl_s=30.0, max_ttl_s=86400.0)


def fetcher_for(jwks_server: JwksServer, tenant: str = "a", session: aiohttp.ClientSession | None = None, **cfg: object) -> JwksFetcher:
    return JwksFetcher(issuer_config(jwks_server, tenant, **cfg), SETTINGS, session)


def test_settings_take_only_the_fetch_slice_of_auth() -> None:
    auth = AuthConfig(jwks_fetch_timeout_s=2, jwks_cache_ttl_s=3, jwks_min_ttl_s=1, jwks_max_ttl_s=4,
                      jwks_max_stale_s=99, jwks_refetch_cooldown_s=98)
    assert FetchSettings.from_auth(auth) == FetchSettings(timeout_s=2, default_ttl_s=3, min_ttl_s=1, max_ttl_s=4)


def test_error_kinds_keep_their_metric_and_log_values() -> None:
    assert [k.value for k in FetchErrorKind] == [
        "connection", "timeout", "http_status", "bad_json", "bad_document", "no_usable_keys", "discovery", "internal"]
    assert FetchErrorKind.TIMEOUT == "timeout" and f"{FetchErrorKind.BAD_JSON}" == "bad_json"


async def test_one_fetch_returns_keys_and_ttl(jwks_server: JwksServer, session: aiohttp.ClientSession) -> None:
    jwks_server.cache_control = "max-age=120"
    fetched = await fetcher_for(jwks_server, session=session).fetch()
    assert list(fetched.keys) == ["a-rsa"] and fetched.ttl_s == 120
    assert jwks_server.fetches("a") == 1


async def test_an_unchanged_jwk_keeps_its_imported_key(jwks_server: JwksServer, session: aiohttp.ClientSession) -> None:
    fetcher = fetcher_for(jwks_server, session=session)
    first = await fetcher.fetch()
    again = await fetcher.fetch(first.keys)
    assert again.keys["a-rsa"][1] is first.keys["a-rsa"][1]
    fresh = await fetcher.fetch()
    assert fresh.keys["a-rsa"][1] is not first.keys["a-rsa"][1]


def test_parse_without_network_and_ttl_defaults(jwks_server: JwksServer) -> None:
    fetcher = fetcher_for(jwks_server)
    fetched = fetcher.parse({"keys": [signer("k1").jwk()]})
    assert list(fetched.keys) == ["k1"] and fetched.ttl_s == 300
    assert fetcher.parse({"keys": [signer("k1").jwk()]}, cache_control="no-store").ttl_s == 30
    with pytest.raises(JwksFetchError) as err:
        fetcher.parse({"keys": "nope"})
    assert err.value.kind is FetchErrorKind.BAD_DOCUMENT


async def test_without_a_session_a_fetch_is_an_internal_error(jwks_server: JwksServer) -> None:
    with pytest.raises(JwksFetchError) as err:
        await fetcher_for(jwks_server).fetch()
    assert err.value.kind is FetchErrorKind.INTERNAL and jwks_server.fetches("a") == 0


async def test_discovered_uri_is_kept_until_it_fails(jwks_server: JwksServer, session: aiohttp.ClientSession) -> None:
    fetcher = fetcher_for(jwks_server, session=session, jwks_uri=None)
    await fetcher.fetch()
    await fetcher.fetch()
    assert jwks_server.hits["/a/.well-known/openid-configuration"] == 1
    jwks_server.mode = "503"
    with pytest.raises(JwksFetchError) as err:
        await fetcher.fetch()
    assert err.value.kind is FetchErrorKind.HTTP_STATUS
    jwks_server.mode = "ok"
    await fetcher.fetch()                               # the issuer may have moved it: discovered again
    assert jwks_server.hits["/a/.well-known/openid-configuration"] == 2
