"""proxy/auth/authenticator.py alone: every outcome of the Authenticator, on a Request built without a socket.

The verifier is the real one over a preloaded key set (no network) on a FakeClock;
tokens come from the key fake in tests/support/keys.py. The end-to-end view of
the same rules, over real sockets and a real IdP, is tests/e2e/auth/test_auth_gateway.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.auth.access import AccessPolicy
from proxy.auth.authenticator import EXEMPT, Authenticator, AuthOutcome, AuthResult
from proxy.util.clock import FakeClock
from proxy.settings.config import build_config
from proxy.auth.jwks_refresh import JwksRegistry
from proxy.edge.request import Request
from proxy.auth.principal import PrincipalKind
from proxy.arp.routes import GET_RUN, START_RUN, Route
from proxy.auth.tokens import TokenVerifier
from tests.support.keys import AUDIENCE, claims_for, signer

ISSUER = "http://127.0.0.1:1/idp"
REALM = 'Bearer realm="test-realm"'


def authenticator(clock: FakeClock, *, keys: bool = True, **auth: Any) -> Authenticator:
    raw = {"mode": "required", "realm": "test-realm",
           "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_uri": ISSUER + "/jwks"}],
           "rules": [{"path": "/v1/runs", "methods": ["POST"], "scopes": ["runs:admin"]}], **auth}
    cfg = build_config({"auth": raw}).auth
    registry = JwksRegistry(cfg, clock)
    if keys:
        registry.refresher(ISSUER).set_remote_jwks({"keys": [signer("k1").jwk()]})
    verifier = TokenVerifier(cfg, registry, clock) if cfg.mode != "disabled" else None
    return Authenticator(cfg, verifier, AccessPolicy(cfg.rules))


def request(method: str = "GET", *authorization: bytes) -> Request:
    req = Request(None)  # type: ignore[arg-type]  # the authenticator reads no connection
    req.method = method
    req.request_id = "rid-1"
    req.authorization = list(authorization)
    return req


def token(clock: FakeClock, **claims: Any) -> bytes:
    return b"Bearer " + signer("k1").sign(claims_for(ISSUER, clock, **claims)).encode()


async def outcome(authn: Authenticator, req: Request, route: Route = GET_RUN) -> AuthOutcome:
    decided = authn.authenticate(req, route)
    return decided if isinstance(decided, AuthOutcome) else await decided


def refusal(out: AuthOutcome, status: int, code: str, reason: str) -> dict[str, Any]:
    assert out.refusal is not None and out.principal is None and out.identity == b""
    assert out.refusal.status == status and out.reason == reason
    error = json.loads(out.refusal.body)["error"]
    assert error["code"] == code and error["details"]["reason"] == reason
    assert error["details"]["request_id"] == "rid-1"
    return error


async def test_valid_token_is_allowed_with_identity_lines(clock: FakeClock) -> None:
    authn = authenticator(clock)
    bearer = token(clock, sub="alice")
    out = await outcome(authn, request("GET", bearer))
    assert out.refusal is None and out.result is AuthResult.ALLOWED and out.result == "allowed"
    assert out.principal is not None and out.principal.subject == "alice" and out.principal.kind is PrincipalKind.TOKEN
    lines = out.identity.decode().split("\r\n")
    assert "X-Auth-Subject: alice" in lines and f"X-Auth-Issuer: {ISSUER}" in lines
    assert "X-Auth-Scopes: runs:read runs:write" in lines
    assert bearer.decode() in "\n".join(lines)          # forward_token: passthrough
    again = await outcome(authn, request("GET", bearer))
    assert again is out and again.identity is out.identity   # built once per principal and route (cached)
    denied = await outcome(authn, request("POST", bearer), START_RUN)   # another route: its own rules apply
    assert denied.result is AuthResult.DENIED


async def test_strip_sends_no_token_upstream(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock, forward_token="strip"), request("GET", token(clock)))
    assert out.result == "allowed" and b"Authorization" not in out.identity


async def test_disabled_mode_is_the_dev_principal_whatever_is_sent(clock: FakeClock) -> None:
    authn = authenticator(clock, mode="disabled", dev_subject="developer")
    for headers in ((), (b"Basic eA==",), (b"Bearer a", b"Bearer b")):
        out = await outcome(authn, request("POST", *headers), START_RUN)
        assert out.refusal is None and out.result is AuthResult.DEV and out.reason == ""
        assert out.principal is not None and out.principal.kind == "dev" and out.principal.subject == "developer"
        assert b"X-Auth-Subject: developer\r\n" in out.identity


async def test_optional_mode_without_token_is_anonymous(clock: FakeClock) -> None:
    authn = authenticator(clock, mode="optional")
    out = await outcome(authn, request("GET"))
    assert out.refusal is None and out.result is AuthResult.ANONYMOUS
    assert out.principal is not None and out.principal.kind is PrincipalKind.ANONYMOUS
    assert out.identity == b"X-Auth-Subject: anonymous\r\n"


async def test_optional_mode_asks_for_a_token_where_a_rule_needs_one(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock, mode="optional"), request("POST"), START_RUN)
    refusal(out, 401, "unauthorized", "missing_token")
    assert out.result is AuthResult.UNAUTHENTICATED and out.refusal.header("WWW-Authenticate") == REALM


async def test_optional_mode_still_refuses_a_bad_token(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock, mode="optional"), request("GET", b"Bearer not.a.token"))
    refusal(out, 401, "unauthorized", "malformed")


async def test_missing_token_gets_a_plain_challenge(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock), request("GET"))
    refusal(out, 401, "unauthorized", "missing_token")
    assert out.result == "unauthenticated" and out.refusal.header("WWW-Authenticate") == REALM


async def test_other_scheme_gets_a_plain_challenge(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock), request("GET", b"Basic dXNlcjpwYXNz"))
    refusal(out, 401, "unauthorized", "unsupported_scheme")
    assert out.refusal.header("WWW-Authenticate") == REALM


async def test_scheme_is_case_insensitive(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock), request("GET", b"bEaReR " + token(clock)[7:]))
    assert out.result == "allowed"


@pytest.mark.parametrize("value", [b"Bearer", b"Bearer ", b"Bearer    "])
async def test_empty_token_is_an_invalid_request(clock: FakeClock, value: bytes) -> None:
    out = await outcome(authenticator(clock), request("GET", value))
    refusal(out, 400, "invalid_request", "empty_token")
    assert out.refusal.header("WWW-Authenticate") == (
        REALM + ', error="invalid_request", error_description="The Bearer token is empty"')


async def test_two_authorization_headers_are_an_invalid_request(clock: FakeClock) -> None:
    bearer = token(clock)
    out = await outcome(authenticator(clock), request("GET", bearer, bearer))
    refusal(out, 400, "invalid_request", "multiple_authorization_headers")
    assert 'error="invalid_request"' in out.refusal.header("WWW-Authenticate")


@pytest.mark.parametrize("make, reason", [
    (lambda clock: b"Bearer not-a-jws", "malformed"),
    (lambda clock: token(clock, exp=int(clock.time()) - 3600), "expired"),
    (lambda clock: token(clock, aud="someone-else"), "audience_mismatch"),
    (lambda clock: token(clock, iss="http://127.0.0.1:1/other"), "issuer_mismatch"),
    (lambda clock: token(clock, sub=None), "missing_claim"),
    (lambda clock: b"Bearer " + signer("k1").sign(claims_for(ISSUER, clock), alg="PS256").encode(), "unsupported_alg"),
    (lambda clock: b"Bearer " + signer("k2", kid="k1").sign(claims_for(ISSUER, clock)).encode(), "bad_signature"),
    (lambda clock: b"Bearer " + b"a" * 9000, "token_too_large"),
])
async def test_invalid_tokens_get_an_invalid_token_challenge(clock: FakeClock, make: Any, reason: str) -> None:
    value = make(clock)
    out = await outcome(authenticator(clock), request("GET", value if isinstance(value, bytes) else value.encode()))
    error = refusal(out, 401, "unauthorized", reason)
    challenge = out.refusal.header("WWW-Authenticate")
    assert challenge.startswith(REALM + ', error="invalid_token", error_description="')
    assert error["message"] in challenge
    token_text = value[7:].decode() if isinstance(value, bytes) else value
    assert token_text not in out.refusal.body.decode()


async def test_keys_unavailable_is_503_with_retry_after(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock, keys=False), request("GET", token(clock)))
    error = refusal(out, 503, "auth_unavailable", "keys_unavailable")
    assert out.result is AuthResult.UNAVAILABLE and error["retryable"] is True
    assert out.refusal.header("Retry-After") == "30"      # the unknown-kid cooldown just started


async def test_missing_scope_is_denied_with_insufficient_scope(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock), request("POST", token(clock)), START_RUN)
    error = refusal(out, 403, "forbidden", "insufficient_scope")
    assert out.result is AuthResult.DENIED and error["details"]["required_scopes"] == ["runs:admin"]
    assert out.refusal.header("WWW-Authenticate") == REALM + ', error="insufficient_scope", scope="runs:admin"'
    allowed = await outcome(authenticator(clock), request("POST", token(clock, scope="runs:admin")), START_RUN)
    assert allowed.result == "allowed"


async def test_claims_that_cannot_be_headers_are_invalid_claims(clock: FakeClock) -> None:
    out = await outcome(authenticator(clock), request("GET", token(clock, sub="alice\r\nX-Auth-Subject: admin")))
    refusal(out, 401, "unauthorized", "invalid_claims")
    assert 'error="invalid_token"' in out.refusal.header("WWW-Authenticate")
    long = await outcome(authenticator(clock, max_token_bytes=20000), request("GET", token(clock, sub="a" * 8193)))
    refusal(long, 401, "unauthorized", "invalid_claims")


def test_exempt_paths_and_the_exempt_outcome(clock: FakeClock) -> None:
    authn = authenticator(clock)
    for path in ("/v1/health", "/v1/version", "/v1/runs"):
        req = request("GET")
        req.path = path
        decided = authn.authenticate(req, GET_RUN)
        assert (decided is EXEMPT) == (path != "/v1/runs"), path
    assert EXEMPT.result is AuthResult.EXEMPT and EXEMPT.refusal is None and EXEMPT.principal is None


def test_result_values_are_the_metric_labels() -> None:
    assert [r.value for r in AuthResult] == [
        "allowed", "exempt", "anonymous", "dev", "denied", "unauthenticated", "unavailable"]


async def test_a_repeated_header_is_decided_as_if_first_seen(clock: FakeClock) -> None:
    """The authenticator keeps the last Bearer header it parsed: whatever order headers come in,
    each gets the outcome a fresh authenticator gives it (empty and non-Bearer ones included)."""
    good, other = token(clock, sub="alice"), token(clock, sub="bob")
    headers = [b"", good, good, b"", b"Basic YTpi", good, b"Bearer ", b"Bearer  ", other, good, b"bearer " + good[7:],
               good + b"x", b"", other, b"Bearer", good]
    memo = authenticator(clock)
    for header in headers:
        seen = await outcome(memo, request("GET", header))
        fresh = await outcome(authenticator(clock), request("GET", header))
        assert (seen.result, seen.reason, seen.principal and seen.principal.subject) == \
            (fresh.result, fresh.reason, fresh.principal and fresh.principal.subject), header
