"""Checks that the mock IdP harness (tests/idp/server.mjs + tests/support/idp.py) really works."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import aiohttp
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, ExpiredTokenError, JoseError
from joserfc.jwk import KeySet

from tests.support import idp as idp_module
from tests.support.idp import MockIdp, MockIdpError

pytestmark = pytest.mark.asyncio


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


def _verify(token: str, jwks: dict, issuer: str, **claims_options) -> jwt.Token:
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"])
    jwt.JWTClaimsRegistry(iss={"essential": True, "value": issuer}, **claims_options).validate(decoded.claims)
    return decoded


async def test_discovery_jwks_and_token_verification() -> None:
    async with await MockIdp.start() as idp:
        split = urlsplit(idp.issuer)
        assert (split.scheme, split.hostname, split.port) == ("http", "127.0.0.1", idp.port)

        async with aiohttp.ClientSession() as session:
            discovery = await _get_json(session, idp.discovery_url)
            assert discovery["issuer"] == idp.issuer
            assert discovery["jwks_uri"] == idp.jwks_uri == f"http://127.0.0.1:{idp.port}/jwks"
            jwks = await _get_json(session, discovery["jwks_uri"])

        assert [k["kid"] for k in jwks["keys"]] == [idp.kid]
        (key,) = jwks["keys"]
        assert key["kty"] == "RSA" and key["alg"] == "RS256"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys(), "private key material leaked into JWKS"

        before = int(time.time())
        token = await idp.token({"sub": "alice", "aud": "arp-gateway", "scope": "runs:write", "tenant": "t1"}, ttl=120)
        decoded = _verify(
            token, jwks, idp.issuer, sub={"essential": True, "value": "alice"}, aud={"essential": True, "value": "arp-gateway"}
        )
        assert decoded.header["kid"] == idp.kid
        assert decoded.header["alg"] == "RS256"
        claims = decoded.claims
        assert claims["iss"] == idp.issuer
        assert claims["scope"] == "runs:write" and claims["tenant"] == "t1"
        assert claims["exp"] - claims["iat"] == 120
        assert before - 1 <= claims["iat"] <= int(time.time()) + 1

        # Claim overrides and removal, expired tokens, forged header kid.
        no_exp = jwt.decode(await idp.token({"exp": None, "sub": "bob"}), KeySet.import_key_set(jwks))
        assert "exp" not in no_exp.claims and no_exp.claims["sub"] == "bob"

        expired = await idp.token({"sub": "carol"}, ttl=-60)
        with pytest.raises(ExpiredTokenError):
            _verify(expired, jwks, idp.issuer)

        wrong_iss = await idp.token({"iss": "http://127.0.0.1:1"})
        with pytest.raises(JoseError):
            _verify(wrong_iss, jwks, idp.issuer)

        forged_kid = await idp.token({"sub": "mallory"}, header={"kid": "not-a-published-kid"})
        with pytest.raises(JoseError):
            _verify(forged_kid, jwks, idp.issuer)

        with pytest.raises(MockIdpError, match="unknown signing kid"):
            await idp.token({}, kid="no-such-key")


async def test_rotation_replaces_key_in_jwks() -> None:
    async with await MockIdp.start() as idp, aiohttp.ClientSession() as session:
        old_kid = idp.kid
        old_token = await idp.token({"sub": "alice"})
        old_jwks = await _get_json(session, idp.jwks_uri)
        _verify(old_token, old_jwks, idp.issuer)

        new_kid = await idp.rotate()
        assert new_kid != old_kid and idp.kid == new_kid
        new_jwks = await _get_json(session, idp.jwks_uri)
        assert [k["kid"] for k in new_jwks["keys"]] == [new_kid]  # old kid is gone
        assert await idp.jwks() == new_jwks

        new_token = await idp.token({"sub": "alice"})
        assert jwt.decode(new_token, KeySet.import_key_set(new_jwks)).header["kid"] == new_kid
        _verify(new_token, new_jwks, idp.issuer)
        with pytest.raises(JoseError):  # old token's kid is no longer published
            _verify(old_token, new_jwks, idp.issuer)
        with pytest.raises(BadSignatureError):  # and the old key cannot verify new tokens
            jwt.decode(new_token, KeySet.import_key_set(old_jwks).get_by_kid(old_kid), algorithms=["RS256"])

        # Overlapping rotation keeps the previous key published.
        third_kid = await idp.rotate(keep_old=True)
        overlap = await _get_json(session, idp.jwks_uri)
        assert sorted(k["kid"] for k in overlap["keys"]) == sorted([new_kid, third_kid])
        assert jwt.decode(await idp.token({}), KeySet.import_key_set(overlap)).header["kid"] == third_kid
        _verify(new_token, overlap, idp.issuer)


async def test_stop_and_start_listening_keeps_port_and_keys() -> None:
    async with await MockIdp.start() as idp, aiohttp.ClientSession() as session:
        port, kid = idp.port, idp.kid
        jwks_before = await _get_json(session, idp.jwks_uri)  # leaves a pooled keep-alive connection

        await idp.stop_listening()
        assert not idp.listening
        for url in (idp.jwks_uri, idp.discovery_url):
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
        # Tokens can still be minted during the outage (keys live in the process).
        token_during_outage = await idp.token({"sub": "alice"})
        await idp.stop_listening()  # idempotent

        await idp.start_listening()
        assert idp.listening and idp.port == port and idp.kid == kid
        jwks_after = await _get_json(session, f"http://127.0.0.1:{port}/jwks")
        assert jwks_after == jwks_before
        _verify(token_during_outage, jwks_after, idp.issuer)
        discovery = await _get_json(session, idp.discovery_url)
        assert discovery["jwks_uri"] == idp.jwks_uri
        await idp.start_listening()  # idempotent


async def test_close_is_idempotent_and_commands_fail_after_close() -> None:
    idp = await MockIdp.start()
    await idp.close()
    await idp.close()
    with pytest.raises(MockIdpError, match="closed"):
        await idp.token({})


async def test_missing_node_modules_gives_actionable_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(idp_module, "_MARKER_MODULE", tmp_path / "node_modules" / "oauth2-mock-server" / "package.json")
    with pytest.raises(MockIdpError, match=r"npm ci --prefix tests/idp"):
        await MockIdp.start()
