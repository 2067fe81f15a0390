"""Who a request acts for, once authentication has decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ..util.certificates import PeerCertificate


class Caller(Protocol):
    """What authentication reads of a request: the listener's Request, without depending on it."""

    method: str
    path: str
    request_id: str
    authorization: list[bytes]   # every Authorization header value, as sent

    @property
    def client_certificate(self) -> PeerCertificate | None:
        """The connection's verified client certificate (listen.tls with client certificates), else None."""


class PrincipalKind(StrEnum):
    TOKEN = "token"           # a verified bearer token
    ANONYMOUS = "anonymous"   # no token, in auth.mode optional
    DEV = "dev"               # auth.mode disabled: nothing was verified


# eq=False: a Principal is equal only to itself, and hashed by identity. The token cache hands back the
# same one for each request with the same token, so what is made once per caller is kept under it.
@dataclass(frozen=True, slots=True, eq=False)
class Principal:
    subject: str
    issuer: str | None = None          # None for the anonymous and dev principals
    scopes: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict)
    token: str | None = None           # the verified bearer token, for passthrough/exchange
    expires_at: float | None = None    # the token's `exp`
    kind: PrincipalKind = PrincipalKind.TOKEN


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """OAuth `scope` is a space-separated string; some IdPs send `scp` as a list or string.
    Split on the space alone (RFC 6749 3.3): any other whitespace stays inside a scope, where
    the identity check refuses it rather than letting it pass as a separator."""
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return frozenset(s for s in raw.split(" ") if s)
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()
