"""Identity at the edge: the coordinator trusts X-Auth-* headers, so only the gateway may ever set them.

Origin servers differ in how they read header names (some fold `_` to `-`,
all ignore case), so a client header that any of them could read as an
identity header must be dropped. And a verified token's claims become header
values: a claim that cannot be a clean header value is refused, not trimmed.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.rawhttp import RawConnection, Response, request
from tests.support.recording import strict_upstream  # noqa: F401  (fixture)
from tests.support.threadidp import ThreadIdp

AUD = "arp-edge-identity"
SPOOF = "spoofed-admin"
CLAIM_HEADERS = {"tenant": "X-Tenant-Id", "email": "X-User-Email"}
SPOOFED_NAMES = ["X-Auth-Subject", "x-auth-subject", "X_Auth_Subject", "x_auth_subject", "X-AUTH_Scopes",
                 "X_AUTH_ISSUER", "X-Auth-Issuer", "X-Auth-Anything", "X-Tenant-Id", "x_tenant_id", "X-TENANT_ID",
                 "X_User_Email", "x-user-email"]


def auth_for(idp: ThreadIdp, **extra: Any) -> dict[str, Any]:
    return {"mode": "required", "issuers": [{"issuer": idp.issuer, "audiences": [AUD]}],
            "claim_headers": CLAIM_HEADERS, **extra}


async def send(url: str, data: bytes) -> Response:
    async with await RawConnection.open(url) as conn:
        await conn.send(data)
        resp = await conn.response()
        assert resp is not None, "the gateway closed without an answer"
        return resp


def identity_like(rec: Any) -> dict[bytes, list[bytes]]:
    """Every header the coordinator got whose folded name is an identity or claim header name."""
    wanted = {b"x-auth-", *(n.lower().encode() for n in CLAIM_HEADERS.values())}
    out: dict[bytes, list[bytes]] = {}
    for (_, value), folded in zip(rec.headers, rec.folded_names()):
        if folded.startswith(b"x-auth-") or folded in wanted:
            out.setdefault(folded, []).append(value)
    return out


async def test_spoofed_identity_headers_never_reach_the_coordinator_with_auth_disabled(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, auth={"mode": "disabled", "dev_subject": "dev-user",
                                                   "claim_headers": CLAIM_HEADERS})
    resp = await send(url, request("GET", "/v1/runs/r1", [(name, SPOOF) for name in SPOOFED_NAMES]))
    assert resp.status == 200, resp.describe()
    (rec,) = strict_upstream.requests
    assert identity_like(rec) == {b"x-auth-subject": [b"dev-user"]}


async def test_with_a_token_the_coordinator_sees_exactly_the_gateways_identity(gateway, strict_upstream, idp):
    url = await gateway(strict_upstream.url, auth=auth_for(idp))
    token = await idp.token({"sub": "alice", "aud": AUD, "tenant": "t-1", "scope": "runs:read runs:write"})
    headers = [(name, SPOOF) for name in SPOOFED_NAMES] + [("Authorization", f"Bearer {token}")]
    resp = await send(url, request("GET", "/v1/runs/r1", headers))
    assert resp.status == 200, resp.describe()
    (rec,) = strict_upstream.requests
    assert identity_like(rec) == {b"x-auth-subject": [b"alice"], b"x-auth-issuer": [idp.issuer.encode()],
                                  b"x-auth-scopes": [b"runs:read runs:write"], b"x-tenant-id": [b"t-1"]}


async def test_a_custom_identity_prefix_is_stripped_the_same_way(gateway, strict_upstream, idp):
    url = await gateway(strict_upstream.url, auth=auth_for(idp, identity_header_prefix="X-Principal-"))
    token = await idp.token({"sub": "alice", "aud": AUD})
    headers = [("X_Principal_Subject", SPOOF), ("x-principal-SUBJECT", SPOOF), ("X-PRINCIPAL_Issuer", SPOOF),
               ("Authorization", f"Bearer {token}")]
    resp = await send(url, request("GET", "/v1/runs/r1", headers))
    assert resp.status == 200, resp.describe()
    (rec,) = strict_upstream.requests
    folded = rec.folded_names()
    assert folded.count(b"x-principal-subject") == 1 and rec.one("X-Principal-Subject") == b"alice"
    assert all(SPOOF.encode() not in value for _, value in rec.headers)


BAD_CLAIMS = [
    ({"sub": "bob\u0000x"}, "NUL in sub"),
    ({"sub": "bob\r\nX-Evil: 1"}, "CRLF in sub"),
    ({"sub": "bob\tx"}, "tab in sub"),
    ({"sub": "bob\u007fx"}, "DEL in sub"),
    ({"sub": "bob\u0085x"}, "C1 control in sub"),
    ({"sub": "a" * 8193}, "sub over 8192 bytes"),
    ({"sub": "alice", "tenant": "t\r\nX-Auth-Subject: admin"}, "CRLF in a claim header"),
    ({"sub": "alice", "tenant": "t" * 8193}, "claim header over 8192 bytes"),
    ({"sub": "alice", "scope": "runs:read\nadmin"}, "LF in scope"),
]


@pytest.mark.parametrize("claims", [c for c, _ in BAD_CLAIMS], ids=[i for _, i in BAD_CLAIMS])
async def test_claims_that_cannot_be_clean_header_values_are_401_invalid_claims(gateway, strict_upstream, idp,
                                                                                claims):
    url = await gateway(strict_upstream.url, auth=auth_for(idp, max_token_bytes=32768))
    token = await idp.token({"aud": AUD, **claims})
    resp = await send(url, request("GET", "/v1/runs/r1", [("Authorization", f"Bearer {token}")]))
    assert resp.status == 401, resp.describe()
    error = resp.envelope()
    assert error is not None and error["details"].get("reason") == "invalid_claims", resp.describe()
    assert strict_upstream.requests == []


async def test_a_long_but_clean_subject_is_forwarded_whole(gateway, strict_upstream, idp):
    url = await gateway(strict_upstream.url, auth=auth_for(idp, max_token_bytes=32768))
    subject = "u" * 8192
    token = await idp.token({"aud": AUD, "sub": subject})
    resp = await send(url, request("GET", "/v1/runs/r1", [("Authorization", f"Bearer {token}")]))
    assert resp.status == 200, resp.describe()
    (rec,) = strict_upstream.requests
    assert rec.one("X-Auth-Subject") == subject.encode()
