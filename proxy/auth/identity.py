"""What the Run Coordinator learns about the caller: decided here, and nowhere else.

The gateway's own identity headers (`X-Auth-Subject`, `-Issuer`, `-Scopes` and the
configured claim headers), and the token the coordinator gets: the verified one
(`forward_token: passthrough`), none (`strip`), or one from RFC 8693 token exchange
(`exchange`). Claims are attacker-influenced text: a value with a control character,
or longer than MAX_IDENTITY_VALUE, is never cleaned or cut (two callers could become
one); `lines()` answers None and the token is refused. Client-sent headers that could
pass for these are dropped in `upstream/headers.py`.

    identity = Identity(cfg.auth, exchanger)
    lines = identity.lines(principal)                   # None: refuse the token (invalid_claims)
    header_block = identity.now(request, outcome)       # when nothing has to be fetched
    header_block += await identity.exchanged(request, principal)   # with token exchange (`waits`)
"""

from __future__ import annotations

import re

from ..arp.answers import Answer, error_answer
from ..settings.config import AuthConfig, ForwardToken
from ..util.boundedcache import BoundedCache
from ..util.certificates import PeerCertificate
from .exchange import ExchangeFailed, TokenExchanger
from .principal import Caller, Principal, PrincipalKind

CACHE_SIZE = 10000
# Longer identity values are refused rather than cut: two subjects must never become one.
MAX_IDENTITY_VALUE = 8192
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Identity:
    def __init__(self, cfg: AuthConfig, exchanger: TokenExchanger | None = None) -> None:
        self._prefix = cfg.identity_header_prefix
        self._claim_headers = cfg.claim_headers
        self._passthrough = cfg.forward_token == ForwardToken.PASSTHROUGH
        self.exchanger = exchanger
        # Whether building a request's identity can wait on the network (token exchange).
        self.waits = exchanger is not None
        self._lines: BoundedCache[int, tuple[Principal, bytes | None]] = BoundedCache(CACHE_SIZE)
        self._certificates: BoundedCache[int, tuple[PeerCertificate, bytes]] = BoundedCache(CACHE_SIZE)

    def lines(self, principal: Principal) -> bytes | None:
        """The principal's identity header lines and, with `forward_token: passthrough`, its verified
        token; None when a claim cannot be sent as it is.

        Cached per principal object: the token cache hands back the same Principal for a repeat
        token, so its lines are built and encoded once, not per request."""
        cached = self._lines.get(id(principal))
        if cached is not None and cached[0] is principal:
            return cached[1]
        headers = self._headers(principal)
        block: bytes | None = None
        if headers is not None:
            if self._passthrough and principal.token is not None:
                headers.append(("Authorization", f"Bearer {principal.token}"))
            block = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8")
        self._lines.put(id(principal), (principal, block))  # holds the principal: its id stays its own
        return block

    def now(self, request: Caller, outcome_principal: Principal | None, lines: bytes) -> bytes:
        """Everything the coordinator learns about the caller of `request`, when nothing has to be
        fetched: the admitted principal's `lines` and, with auth disabled, the client's own token
        (nothing verified it, but a coordinator may still check it itself)."""
        if outcome_principal is None:
            return b""
        if (outcome_principal.kind == PrincipalKind.DEV and self._passthrough
                and len(request.authorization) == 1):
            return lines + b"Authorization: " + request.authorization[0] + b"\r\n"
        return lines

    def certificate(self, certificate: PeerCertificate) -> bytes:
        """The client certificate's subject and SAN URIs (SPIFFE IDs) as identity header lines, built
        once per certificate object (one per connection); a value unsafe in a header is left out."""
        cached = self._certificates.get(id(certificate))
        if cached is not None and cached[0] is certificate:
            return cached[1]
        headers = [(f"{self._prefix}Client-Cert-Subject", certificate.subject),
                   (f"{self._prefix}Client-Cert-URI", ", ".join(certificate.uris))]
        block = "".join(f"{name}: {value}\r\n" for name, value in headers
                        if value and _header_safe(value)).encode("utf-8")
        self._certificates.put(id(certificate), (certificate, block))
        return block

    async def exchanged(self, request: Caller, outcome_principal: Principal) -> bytes | Answer:
        """With `forward_token: exchange` (`waits`): the exchanged token's header line, added to what
        `now` gave; the 502 when the STS fails."""
        assert self.exchanger is not None
        try:
            token = await self.exchanger.token_for(outcome_principal.token)
        except ExchangeFailed as exc:
            return error_answer(502, "token_exchange_failed", "Could not obtain a token for the Run Coordinator",
                                request_id=request.request_id, retryable=exc.retryable,
                                details={"reason": exc.reason})
        return b"Authorization: Bearer " + token.encode() + b"\r\n"

    def _headers(self, principal: Principal) -> list[tuple[str, str]] | None:
        prefix = self._prefix
        headers = [(f"{prefix}Subject", principal.subject)]
        if principal.issuer:
            headers.append((f"{prefix}Issuer", principal.issuer))
        if principal.scopes:
            headers.append((f"{prefix}Scopes", " ".join(sorted(principal.scopes))))
        for claim, header in self._claim_headers:
            value = principal.claims.get(claim)
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            if value is not None and not isinstance(value, dict):
                headers.append((header, str(value)))
        if all(_header_safe(value) for _, value in headers):
            return headers
        return None


def _header_safe(value: str) -> bool:
    """No control character (C0, DEL, C1), and no longer than MAX_IDENTITY_VALUE."""
    return (len(value) <= MAX_IDENTITY_VALUE and _CONTROL.search(value) is None
            and len(value.encode("utf-8")) <= MAX_IDENTITY_VALUE)
