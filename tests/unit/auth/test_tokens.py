"""Tests for bearer-token verification (proxy/auth/tokens.py) against a real JWKS server.

The scripted JWKS server and the signing keys are in tests/support/keys.py; its fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from joserfc import jws, jwt
from joserfc.jwk import OctKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter

import proxy.auth.tokens
from proxy.util.clock import FakeClock
from proxy.settings.config import AuthConfig
from proxy.auth.jwks_fetch import JwksFetchError
from proxy.auth.jwks_store import KeysUnavailable
from proxy.auth.principal import Principal
from proxy.auth.tokens import (
    AudienceMismatch, BadSignature, Expired, ForbiddenHeader, InvalidClaim, IssuerMismatch,
    MalformedToken, MissingClaim, NotYetValid, TokenError, TokenTooLarge, TokenVerifier,
    UnknownKey, UnsupportedAlg,
)
from tests.support.keys import ASYM_ALGS, JwksServer, Registries, auth_config, claims_for, issuer_config, signer

HMAC_SECRET = "an-hmac-secret-of-at-least-32-bytes!"

VerifierFor = Callable[[AuthConfig], Awaitable[TokenVerifier]]


@pytest.fixture
def verifier_for(registries: Registries, clock: FakeClock) -> VerifierFor:
    async def make(auth: AuthConfig) -> TokenVerifier:
        return TokenVerifier(auth, await registries(auth), clock)
    return make


@pytest.fixture
async def verifier(jwks_server: JwksServer, verifier_for: VerifierFor) -> TokenVerifier:
    return await verifier_for(auth_config(jwks_server))


async def settled(decided: Principal | Awaitable[Principal]) -> Principal:
    """verify's answer, awaited when it is the coroutine that decides (a token not verified before)."""
    return decided if isinstance(decided, Principal) else await decided


def good(jwks_server: JwksServer, clock: FakeClock, tenant: str = "a", **overrides: Any) -> dict[str, Any]:
    return claims_for(jwks_server.issuer(tenant), clock, **overrides)


async def rejected(verifier: TokenVerifier, token: str, error: type[TokenError]) -> TokenError:
    with pytest.raises(error) as caught:
        await settled(verifier.verify(token))
    assert caught.value.reason == error.reason
    if len(token) >= 8:
        assert token not in caught.value.description and token not in str(caught.value)
    return caught.value


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> list[str]:
    return token.split(".")


# --------------------------------------------------------------------------- accepted tokens


@pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")  # joserfc: EdDSA per RFC 9864
@pytest.mark.parametrize("alg", ASYM_ALGS)
async def test_valid_token_passes(jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock, alg: str) -> None:
    key = signer(f"a-{alg}", alg)
    jwks_server.publish("a", key)
    verifier = await verifier_for(auth_config(jwks_server))
    token = key.sign(good(jwks_server, clock))
    principal = await settled(verifier.verify(token))
    assert principal.subject == "user-1" and principal.issuer == jwks_server.issuer("a")
    assert principal.scopes == {"runs:read", "runs:write"} and principal.kind == "token"
    assert principal.token == token and principal.expires_at == clock.time() + 300
    assert principal.claims["aud"] == "arp-run-gateway"


async def test_audience_array_containing_ours_passes(jwks_server: JwksServer, verifier: TokenVerifier,
                                                     clock: FakeClock) -> None:
    token = signer("a-rsa").sign(good(jwks_server, clock, aud=["other", "arp-run-gateway"]))
    assert (await settled(verifier.verify(token))).subject == "user-1"


# --------------------------------------------------------------------------- keys and algorithms


async def test_key_of_another_issuer_never_verifies(jwks_server: JwksServer, verifier: TokenVerifier,
                                                    clock: FakeClock) -> None:
    b_key = signer("b-rsa")
    await rejected(verifier, b_key.sign(good(jwks_server, clock, "a")), UnknownKey)
    # ...not even when the token names one of A's kids.
    await rejected(verifier, b_key.sign(good(jwks_server, clock, "a"), kid="a-rsa"), BadSignature)
    assert (await settled(verifier.verify(b_key.sign(good(jwks_server, clock, "b"))))).issuer == jwks_server.issuer("b")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_rejected(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock, alg: str) -> None:
    header = b64(json.dumps({"alg": alg, "kid": "a-rsa"}).encode())
    payload = b64(json.dumps(good(jwks_server, clock)).encode())
    await rejected(verifier, f"{header}.{payload}.", UnsupportedAlg)


async def test_hs256_signed_with_the_rsa_public_key_is_rejected(
        jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock) -> None:
    pem = signer("a-rsa").key.as_pem(private=False)
    # The classic key-confusion forgery. joserfc refuses to import a PEM as an oct key,
    # so the attacker's key is built directly.
    forged = OctKey(pem, pem)
    claims = good(jwks_server, clock)
    token = jwt.encode({"alg": "HS256", "kid": "a-rsa"}, claims, forged, algorithms=["HS256"])
    await rejected(await verifier_for(auth_config(jwks_server)), token, UnsupportedAlg)
    # Even where HS256 is allowed, only the configured secret is an HMAC key.
    mixed = issuer_config(jwks_server, "a", algorithms=("RS256", "HS256"), hmac_secret=HMAC_SECRET)
    await rejected(await verifier_for(auth_config(jwks_server, mixed)), token, BadSignature)


async def test_hs256_passes_only_on_the_issuer_with_that_secret(
        jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock) -> None:
    secret = OctKey.import_key(HMAC_SECRET.encode())
    token = jwt.encode({"alg": "HS256"}, good(jwks_server, clock, "h"), secret, algorithms=["HS256"])
    with_secret = issuer_config(jwks_server, "h", jwks_uri=None, algorithms=("HS256",), hmac_secret=HMAC_SECRET)
    principal = await settled((await verifier_for(auth_config(jwks_server, with_secret))).verify(token))
    assert principal.issuer == jwks_server.issuer("h")
    without = issuer_config(jwks_server, "h", algorithms=("RS256",))
    await rejected(await verifier_for(auth_config(jwks_server, without)), token, UnsupportedAlg)


async def test_kid_of_a_key_for_another_alg_is_rejected(jwks_server: JwksServer, verifier: TokenVerifier,
                                                        clock: FakeClock) -> None:
    # a-rsa is published with alg RS256; the same RSA key signing PS256 must not pass.
    token = signer("a-rsa").sign(good(jwks_server, clock), alg="PS256")
    await rejected(verifier, token, UnknownKey)


async def test_unknown_kid_refetches_once_then_respects_the_cooldown(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = signer("a-unpublished").sign(good(jwks_server, clock))
    await rejected(verifier, token, UnknownKey)
    assert jwks_server.fetches("a") == 2
    await rejected(verifier, token, UnknownKey)
    assert jwks_server.fetches("a") == 2


async def test_rotated_key_is_picked_up_by_the_unknown_kid_refresh(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    jwks_server.publish("a", signer("a-rsa"), signer("a-rsa-next"))
    token = signer("a-rsa-next").sign(good(jwks_server, clock))
    assert (await settled(verifier.verify(token))).subject == "user-1"
    assert jwks_server.fetches("a") == 2


async def test_thousand_concurrent_tokens_with_a_new_kid_cause_one_fetch(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    jwks_server.publish("a", signer("a-rsa-next"))
    token = signer("a-rsa-next").sign(good(jwks_server, clock))
    principals = await asyncio.gather(*(settled(verifier.verify(token)) for _ in range(1000)))
    assert jwks_server.fetches("a") == 2
    assert len(principals) == 1000 and all(p.subject == "user-1" for p in principals)


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("name", ["jku", "x5u", "jwk", "x5c"])
async def test_key_carrying_headers_are_rejected_and_never_followed(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock, name: str) -> None:
    attacker = signer("attacker")
    value: Any = {
        "jku": f"{jwks_server.base}/evil/jwks",
        "x5u": f"{jwks_server.base}/evil/cert.pem",
        "jwk": attacker.jwk(),
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    }[name]
    token = attacker.sign(good(jwks_server, clock), **{name: value})
    error = await rejected(verifier, token, ForbiddenHeader)
    assert name in error.description
    await asyncio.sleep(0.05)  # had anything gone out, it would have arrived by now
    assert jwks_server.hits["evil"] == 0 and jwks_server.fetches("a") == 1


async def test_crit_header_is_rejected(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    key = signer("a-rsa")
    registry = JWSRegistry(header_registry={"ext": HeaderParameter("an extension", "str")},
                           algorithms=["RS256"])
    header = {"alg": "RS256", "kid": "a-rsa", "crit": ["ext"], "ext": "must-understand"}
    token = jws.serialize_compact(header, json.dumps(good(jwks_server, clock)), key.key, registry=registry)
    await rejected(verifier, token, ForbiddenHeader)


async def test_unknown_non_critical_header_is_ignored(jwks_server: JwksServer, verifier: TokenVerifier,
                                                      clock: FakeClock) -> None:
    header = {"alg": "RS256", "kid": "a-rsa", "x-vendor": "1"}
    lenient = JWSRegistry(algorithms=["RS256"], strict_check_header=False)
    token = jws.serialize_compact(header, json.dumps(good(jwks_server, clock)), signer("a-rsa").key,
                                  registry=lenient)
    assert (await settled(verifier.verify(token))).subject == "user-1"


# --------------------------------------------------------------------------- shape


async def test_oversized_token_is_rejected_before_any_fetch(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = signer("a-unpublished").sign(good(jwks_server, clock, pad="x" * 8192))
    await rejected(verifier, token, TokenTooLarge)
    await rejected(verifier, "a" * 100_000, TokenTooLarge)
    assert jwks_server.fetches("a") == 1 and verifier.cache_misses == 0


@pytest.mark.parametrize("token", [
    "not-base64!.eyJ9.sig",
    "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0",        # two segments
    "a.b.c.d",
    "",
    "ééé.ééé.ééé",
    b64(b"[1]") + "." + b64(b"{}") + ".c2ln",       # header is not an object
    b64(b'{"alg":"RS256"}') + ".%%%.c2ln",           # payload not base64url
    b64(b'{"alg":"RS256"}') + "." + b64(b"[1,2]") + ".c2ln",  # payload not an object
    b64(b'{"typ":"JWT"}') + "." + b64(b"{}") + ".c2ln",       # no alg
])
async def test_malformed_tokens(verifier: TokenVerifier, token: str) -> None:
    await rejected(verifier, token, MalformedToken)


async def test_tampered_payload_fails(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    header, _, signature = segments(signer("a-rsa").sign(good(jwks_server, clock)))
    forged = b64(json.dumps(good(jwks_server, clock, sub="admin")).encode())
    await rejected(verifier, f"{header}.{forged}.{signature}", BadSignature)


async def test_tampered_signature_fails(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    header, payload, signature = segments(signer("a-rsa").sign(good(jwks_server, clock)))
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1:]
    await rejected(verifier, f"{header}.{payload}.{flipped}", BadSignature)


# --------------------------------------------------------------------------- claims


async def test_wrong_issuer(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    key = signer("a-rsa")
    await rejected(verifier, key.sign(good(jwks_server, clock, iss=jwks_server.issuer("c"))), IssuerMismatch)
    await rejected(verifier, key.sign(good(jwks_server, clock, iss=jwks_server.issuer("a") + "/")), IssuerMismatch)
    await rejected(verifier, key.sign(good(jwks_server, clock, iss=None)), MissingClaim)
    await rejected(verifier, key.sign(good(jwks_server, clock, iss=["x"])), InvalidClaim)


@pytest.mark.parametrize("aud", ["someone-else", ["someone-else", "another"], []])
async def test_wrong_audience(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock, aud: Any) -> None:
    await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, aud=aud)), AudienceMismatch)


async def test_audience_missing_or_malformed(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    key = signer("a-rsa")
    await rejected(verifier, key.sign(good(jwks_server, clock, aud=None)), MissingClaim)
    await rejected(verifier, key.sign(good(jwks_server, clock, aud=5)), InvalidClaim)
    await rejected(verifier, key.sign(good(jwks_server, clock, aud=["arp-run-gateway", 5])), InvalidClaim)


def test_default_clock_skew_is_sixty_seconds() -> None:
    assert AuthConfig().clock_skew_s == 60


async def test_expired_beyond_skew_fails(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    now = int(clock.time())
    token = signer("a-rsa").sign(good(jwks_server, clock, iat=now - 400, nbf=now - 400, exp=now - 60))
    await rejected(verifier, token, Expired)


async def test_expired_within_skew_passes(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    now = int(clock.time())
    token = signer("a-rsa").sign(good(jwks_server, clock, iat=now - 400, nbf=now - 400, exp=now - 59))
    assert (await settled(verifier.verify(token))).expires_at == now - 59


async def test_exp_missing(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    error = await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, exp=None)), MissingClaim)
    assert error.claim == "exp"  # type: ignore[attr-defined]


async def test_exp_nan_is_rejected(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    # joserfc's own claims check accepts exp: NaN as "never expires"; Python's json
    # parses the NaN literal. We refuse the non-JSON constant outright.
    payload = json.dumps(good(jwks_server, clock, exp=float("nan"))).encode()
    assert b"NaN" in payload
    await rejected(verifier, signer("a-rsa").sign_raw(payload), MalformedToken)
    for literal in (b"Infinity", b"-Infinity"):
        raw = payload.replace(b"NaN", literal)
        await rejected(verifier, signer("a-rsa").sign_raw(raw), MalformedToken)


async def test_exp_overflowing_to_infinity_is_invalid(jwks_server: JwksServer, verifier: TokenVerifier,
                                                      clock: FakeClock) -> None:
    payload = json.dumps(good(jwks_server, clock, exp=1)).replace('"exp": 1', '"exp": 1e400').encode()
    await rejected(verifier, signer("a-rsa").sign_raw(payload), InvalidClaim)


@pytest.mark.parametrize("exp", ["2000000000", True, {"t": 1}, [1]])
async def test_exp_of_the_wrong_type(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock, exp: Any) -> None:
    error = await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, exp=exp)), InvalidClaim)
    assert error.claim == "exp"  # type: ignore[attr-defined]


async def test_nbf_in_the_future(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    now = int(clock.time())
    await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, nbf=now + 61)), NotYetValid)
    assert await settled(verifier.verify(signer("a-rsa").sign(good(jwks_server, clock, nbf=now + 59))))


async def test_iat_in_the_future(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    now = int(clock.time())
    await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, iat=now + 61)), NotYetValid)
    await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, iat="yesterday")), InvalidClaim)


async def test_subject_is_required(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, sub=None)), MissingClaim)
    await rejected(verifier, signer("a-rsa").sign(good(jwks_server, clock, sub="")), InvalidClaim)


# --------------------------------------------------------------------------- key availability


async def test_cold_start_with_idp_down_is_unavailable_then_recovers(
        jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock) -> None:
    jwks_server.mode = "503"
    verifier = await verifier_for(auth_config(jwks_server))  # registry.start() must not raise
    token = signer("a-rsa").sign(good(jwks_server, clock))
    with pytest.raises(KeysUnavailable) as err:
        await settled(verifier.verify(token))
    assert not isinstance(err.value, TokenError) and err.value.retry_after_s >= 1
    jwks_server.mode = "ok"
    clock.advance(30)
    token = signer("a-rsa").sign(good(jwks_server, clock))
    assert (await settled(verifier.verify(token))).subject == "user-1"


async def test_keys_staler_than_max_stale_are_unavailable(
        jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock) -> None:
    verifier = await verifier_for(auth_config(jwks_server, jwks_max_stale_s=3600, token_cache_size=0))
    jwks_server.mode = "503"
    clock.advance(3601)
    with pytest.raises(KeysUnavailable):
        await settled(verifier.verify(signer("a-rsa").sign(good(jwks_server, clock))))


async def test_cached_tokens_stop_too_when_keys_pass_max_stale(
        jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock) -> None:
    verifier = await verifier_for(auth_config(jwks_server, jwks_max_stale_s=3600))
    token = signer("a-rsa").sign(good(jwks_server, clock, exp=int(clock.time()) + 7200))
    await settled(verifier.verify(token))
    jwks_server.mode = "503"
    clock.advance(3601)
    with pytest.raises(KeysUnavailable):
        await settled(verifier.verify(token))


async def test_failed_refresh_keeps_verifying_with_last_good_keys(
        jwks_server: JwksServer, registries: Registries, clock: FakeClock) -> None:
    auth = auth_config(jwks_server, token_cache_size=0)
    registry = await registries(auth)
    verifier = TokenVerifier(auth, registry, clock)
    jwks_server.mode = "bad_json"
    clock.advance(301)
    assert registry.find_by_issuer(jwks_server.issuer("a")) is not None
    with pytest.raises(JwksFetchError):
        await registry.refresher(jwks_server.issuer("a")).refresh()
    assert (await settled(verifier.verify(signer("a-rsa").sign(good(jwks_server, clock))))).subject == "user-1"


# --------------------------------------------------------------------------- verified-token cache


async def test_cache_hit_skips_signature_verification(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = proxy.auth.tokens.jws.validate_compact

    def counting(*args: Any, **kwargs: Any) -> bool:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(proxy.auth.tokens.jws, "validate_compact", counting)
    token = signer("a-rsa").sign(good(jwks_server, clock))
    first = await settled(verifier.verify(token))
    second = await settled(verifier.verify(token))
    assert second is first and len(calls) == 1
    assert verifier.cache_hits == 1 and verifier.cache_misses == 1


async def test_cache_entry_is_dropped_when_its_kid_leaves_the_jwks(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    old = signer("a-rsa").sign(good(jwks_server, clock))
    await settled(verifier.verify(old))
    jwks_server.publish("a", signer("a-rsa-next"))
    await settled(verifier.verify(signer("a-rsa-next").sign(good(jwks_server, clock))))  # refresh: a-rsa is gone
    await rejected(verifier, old, UnknownKey)
    assert verifier.cache_hits == 0 and verifier.cache_size == 1


async def test_cache_entry_expires_at_exp(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = signer("a-rsa").sign(good(jwks_server, clock, exp=int(clock.time()) + 100))
    await settled(verifier.verify(token))
    clock.advance(99)
    await settled(verifier.verify(token))
    assert verifier.cache_hits == 1
    clock.advance(1)
    await settled(verifier.verify(token))  # inside the skew: verified afresh, but no longer cached
    assert verifier.cache_hits == 1 and verifier.cache_misses == 2 and verifier.cache_size == 0
    clock.advance(60)
    await rejected(verifier, token, Expired)


async def test_cache_is_bounded_lru(jwks_server: JwksServer, verifier_for: VerifierFor, clock: FakeClock) -> None:
    verifier = await verifier_for(auth_config(jwks_server, token_cache_size=2))
    key = signer("a-rsa")
    t1, t2, t3 = (key.sign(good(jwks_server, clock, sub=f"user-{n}")) for n in (1, 2, 3))
    await settled(verifier.verify(t1))
    await settled(verifier.verify(t2))
    await settled(verifier.verify(t1))         # t1 now most recent
    await settled(verifier.verify(t3))         # evicts t2
    assert verifier.cache_size == 2 and verifier.cache_hits == 1
    await settled(verifier.verify(t1))
    assert verifier.cache_hits == 2
    await settled(verifier.verify(t2))
    assert verifier.cache_hits == 2


async def test_cache_size_zero_disables_the_cache(jwks_server: JwksServer, verifier_for: VerifierFor,
                                                  clock: FakeClock) -> None:
    verifier = await verifier_for(auth_config(jwks_server, token_cache_size=0))
    token = signer("a-rsa").sign(good(jwks_server, clock))
    await settled(verifier.verify(token))
    await settled(verifier.verify(token))
    assert verifier.cache_hits == 0 and verifier.cache_size == 0


async def test_rejections_are_not_cached(jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = signer("a-rsa").sign(good(jwks_server, clock, aud="someone-else"))
    await rejected(verifier, token, AudienceMismatch)
    await rejected(verifier, token, AudienceMismatch)
    assert verifier.cache_size == 0 and verifier.cache_hits == 0


def test_errors_have_distinct_reasons() -> None:
    errors = [MalformedToken, TokenTooLarge, UnsupportedAlg, UnknownKey, BadSignature, Expired,
              NotYetValid, IssuerMismatch, AudienceMismatch, InvalidClaim, MissingClaim, ForbiddenHeader]
    assert len({e.reason for e in errors}) == len(errors)
    assert all(issubclass(e, TokenError) for e in errors)
    assert not issubclass(KeysUnavailable, TokenError)


async def test_a_repeat_token_is_answered_without_a_coroutine(jwks_server: JwksServer, verifier: TokenVerifier,
                                                              clock: FakeClock) -> None:
    """One stage: a token with a standing verdict gets its Principal now; a new one, the coroutine."""
    token = signer("a-rsa").sign(good(jwks_server, clock))
    first = verifier.verify(token)
    assert not isinstance(first, Principal)
    principal = await first
    assert verifier.verify(token) is principal and verifier.cache_hits == 1


async def test_a_burst_of_one_new_token_checks_its_signature_once(
        jwks_server: JwksServer, verifier: TokenVerifier, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = []
    check = verifier._check_signature
    monkeypatch.setattr(verifier, "_check_signature", lambda *args: checks.append(1) or check(*args))
    token = signer("a-rsa").sign(good(jwks_server, clock))
    pending = [verifier.verify(token) for _ in range(5)]  # all asked before any is decided
    principals = await asyncio.gather(*(settled(p) for p in pending))
    assert len(checks) == 1 and all(p is principals[0] for p in principals)
