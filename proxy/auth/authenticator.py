"""The per-request authenticator: from an `Authorization` header to a principal or a refusal.

It owns the wire behaviour of RFC 6750 and the ARP spec (which status, which
`WWW-Authenticate`, which ErrorEnvelope); token cryptography lives in
`tokens.py`, key material in `jwks_store.py`, route rules in `access.py`, what the
coordinator learns about the caller in `identity.py`.

    authn = Authenticator(cfg.auth, verifier, AccessPolicy(cfg.auth.rules))
    outcome = authn.authenticate(request, route)        # now, or a coroutine when the token must be verified
    if outcome.refusal is not None:
        request.respond(outcome.refusal)        # never forwarded
    header_lines = outcome.identity             # what the coordinator learns about the caller
"""

from __future__ import annotations

import hmac
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..arp.answers import Answer, error_answer
from ..arp.routes import Route
from ..settings.config import AuthConfig, AuthMode
from ..util.boundedcache import BoundedCache
from .access import AccessPolicy
from .identity import Identity
from .jwks_store import KeysUnavailable
from .principal import Caller, Principal, PrincipalKind
from .tokens import TokenError, TokenVerifier


class AuthResult(StrEnum):
    """What authentication decided; the `result` label of auth metrics and access log lines."""

    ALLOWED = "allowed"                   # a valid token that the route's rules admit
    EXEMPT = "exempt"                     # an exempt path: no token looked at
    ANONYMOUS = "anonymous"               # no token, in optional mode, and the route admits anonymous callers
    DEV = "dev"                           # auth disabled
    DENIED = "denied"                     # a valid token the route's rules refuse (403)
    UNAUTHENTICATED = "unauthenticated"   # no usable token (401, or 400 for a malformed request)
    UNAVAILABLE = "unavailable"           # the issuer's keys are not available (503)


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    principal: Principal | None        # None on exempt routes and refusals
    refusal: Answer | None
    result: AuthResult
    reason: str = ""
    identity: bytes = b""              # identity header lines (and a passthrough token) for the coordinator
    # The configured issuer the decision is counted and logged under: the principal's, or for a
    # refused token the configured issuer it names; None otherwise.
    issuer: str | None = None


EXEMPT = AuthOutcome(None, None, AuthResult.EXEMPT)
ADMITTED_CACHE_SIZE = 10000


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class Authenticator:
    def __init__(self, cfg: AuthConfig, verifier: TokenVerifier | None, policy: AccessPolicy,
                 identity: Identity | None = None) -> None:
        self.cfg = cfg
        self._verifier = verifier
        self._policy = policy
        self._exempt = frozenset(cfg.exempt_paths)
        self._realm = f'Bearer realm="{_quote(cfg.realm)}"'
        self._disabled = cfg.mode == AuthMode.DISABLED
        self._optional = cfg.mode == AuthMode.OPTIONAL
        self._identity = identity or Identity(cfg)
        # An admitted principal on a route is admitted the same way every time: the token cache hands
        # back the same Principal for a repeat token, so its outcome is built once, not per request.
        self._allowed: BoundedCache[tuple[int, Route, str], AuthOutcome] = BoundedCache(ADMITTED_CACHE_SIZE)
        # The dict's own lookup, without recency: a principal that stays busy is simply rebuilt once
        # when it reaches the front, which costs less than reordering on every request.
        self._admitted = self._allowed.getter(touch=False)
        dev = Principal(cfg.dev_subject, kind=PrincipalKind.DEV)
        self._dev = AuthOutcome(dev, None, AuthResult.DEV, identity=self._identity.lines(dev) or b"")
        self._anonymous = Principal(cfg.anonymous_subject, kind=PrincipalKind.ANONYMOUS)
        # Issuers whose tokens are bound to the client certificate (RFC 8705). Without any, requests
        # take the plain authenticate() and the binding costs nothing.
        self._bound = frozenset(i.issuer for i in cfg.issuers if i.require_certificate_binding)
        if self._bound:
            self.authenticate = self._authenticate_bound  # type: ignore[method-assign]
        # The last Bearer header parsed and its token. A client sends the same header request after
        # request: comparing bytes costs less than decoding and splitting them again, and the same
        # token string, its hash already computed, is the key of the verified-token cache. One entry:
        # clients taking turns only cost a compare that fails within the first bytes that differ.
        self._last_header: bytes | None = None
        self._last_token = ""

    def authenticate(self, request: Caller, route: Route) -> AuthOutcome | Coroutine[Any, Any, AuthOutcome]:
        """The outcome now when nothing has to wait (an exempt path, no or bad credentials, a token
        verified before); else the coroutine that verifies the token and gives the outcome."""
        if request.path in self._exempt:
            return EXEMPT
        if self._disabled:
            return self._dev
        values = request.authorization
        if len(values) != 1:
            return self._no_single_token(request, route)
        raw = values[0]
        if raw == self._last_header:
            token = self._last_token
        else:
            scheme, _, token = raw.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                return self._challenge("unsupported_scheme", "Use the Bearer authentication scheme",
                                       request.request_id)
            token = token.strip()
            if not token:
                return self._bad_request("empty_token", "The Bearer token is empty", request.request_id)
            self._last_header, self._last_token = raw, token
        assert self._verifier is not None
        principal = self._verifier.verify(token)
        if principal.__class__ is not Principal:
            return self._verified(request, route, principal)  # type: ignore[arg-type]
        return self._authorize(principal, route, request.method, request.request_id, AuthResult.ALLOWED)

    def _authenticate_bound(self, request: Caller, route: Route) -> AuthOutcome | Coroutine[Any, Any, AuthOutcome]:
        """authenticate(), then RFC 8705 for a principal of a binding issuer. Checked after the token
        cache, per request: the same token may come over another connection, with another
        certificate (or a thief's)."""
        decided = Authenticator.authenticate(self, request, route)
        if decided.__class__ is AuthOutcome:
            return self._bind(decided, request)
        return self._bind_later(decided, request)  # type: ignore[arg-type]

    async def _bind_later(self, pending: Coroutine[Any, Any, AuthOutcome], request: Caller) -> AuthOutcome:
        return self._bind(await pending, request)

    def _bind(self, outcome: AuthOutcome, request: Caller) -> AuthOutcome:
        principal = outcome.principal
        if principal is None or principal.issuer not in self._bound:
            return outcome
        return self._unbound(principal, request) or outcome

    def _unbound(self, principal: Principal, request: Caller) -> AuthOutcome | None:
        """RFC 8705 3: the token's cnf x5t#S256 must be the thumbprint of the connection's client
        certificate; the refusal when it is not, None when it is."""
        certificate = request.client_certificate
        if certificate is None:
            return self._invalid("certificate_required", "the token is bound to a client certificate and none "
                                 "was presented", request.request_id, principal.issuer)
        cnf = principal.claims.get("cnf")
        bound_to = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        if not isinstance(bound_to, str) or not hmac.compare_digest(bound_to.encode(), certificate.thumbprint.encode()):
            return self._invalid("certificate_binding_mismatch", "the token is not bound to the client certificate "
                                 "presented", request.request_id, principal.issuer)
        return None

    def _no_single_token(self, request: Caller, route: Route) -> AuthOutcome:
        """No Authorization header (anonymous in optional mode, else 401), or more than one (400)."""
        if request.authorization:
            return self._bad_request("multiple_authorization_headers", "Send exactly one Authorization header",
                                     request.request_id)
        if self._optional:
            return self._authorize(self._anonymous, route, request.method, request.request_id, AuthResult.ANONYMOUS)
        return self._challenge("missing_token", "A bearer token is required", request.request_id)

    async def _verified(self, request: Caller, route: Route, pending: Coroutine[Any, Any, Principal]) -> AuthOutcome:
        request_id = request.request_id
        try:
            principal = await pending
        except TokenError as exc:
            return self._invalid(exc.reason, exc.description, request_id, exc.issuer)
        except KeysUnavailable as exc:
            return AuthOutcome(None, error_answer(
                503, "auth_unavailable", "Signing keys of the token issuer are not available yet",
                request_id=request_id, retryable=True, details={"reason": "keys_unavailable"},
                headers={"Retry-After": str(exc.retry_after_s)}), AuthResult.UNAVAILABLE, "keys_unavailable",
                issuer=exc.issuer)
        return self._authorize(principal, route, request.method, request_id, AuthResult.ALLOWED)

    def _authorize(self, principal: Principal, route: Route, method: str, request_id: str,
                   result: AuthResult) -> AuthOutcome:
        key = (id(principal), route, method)
        known = self._admitted(key)
        if known is not None and known.principal is principal:
            return known
        denial = self._policy.check(route.template, method, principal)
        if denial is None:
            identity = self._identity.lines(principal)
            if identity is None:
                return self._invalid("invalid_claims", "the token's claims cannot be passed on as identity headers",
                                     request_id, principal.issuer)
            outcome = AuthOutcome(principal, None, result, identity=identity, issuer=principal.issuer)
            self._allowed.put(key, outcome)  # holds the principal, so its id stays its own while cached
            return outcome
        if principal.kind == PrincipalKind.ANONYMOUS:
            # A token could grant what is missing: ask for one rather than forbid.
            return self._challenge("missing_token", "A bearer token is required for this route", request_id)
        scope = " ".join(denial.missing_scopes)
        header = f'{self._realm}, error="insufficient_scope"' + (f', scope="{_quote(scope)}"' if scope else "")
        details: dict[str, object] = {"reason": denial.reason}
        if denial.missing_scopes:
            details["required_scopes"] = list(denial.missing_scopes)
        if denial.failed_claims:
            details["required_claims"] = list(denial.failed_claims)
        return AuthOutcome(None, error_answer(
            403, "forbidden", "The token does not grant access to this route", request_id=request_id,
            details=details, headers={"WWW-Authenticate": header}), AuthResult.DENIED, denial.reason,
            issuer=principal.issuer)

    def _challenge(self, reason: str, message: str, request_id: str) -> AuthOutcome:
        return AuthOutcome(None, error_answer(
            401, "unauthorized", message, request_id=request_id, details={"reason": reason},
            headers={"WWW-Authenticate": self._realm}), AuthResult.UNAUTHENTICATED, reason)

    def _invalid(self, reason: str, description: str, request_id: str, issuer: str | None) -> AuthOutcome:
        header = f'{self._realm}, error="invalid_token", error_description="{_quote(description)}"'
        return AuthOutcome(None, error_answer(
            401, "unauthorized", description, request_id=request_id, details={"reason": reason},
            headers={"WWW-Authenticate": header}), AuthResult.UNAUTHENTICATED, reason, issuer=issuer)

    def _bad_request(self, reason: str, message: str, request_id: str) -> AuthOutcome:
        header = f'{self._realm}, error="invalid_request", error_description="{_quote(message)}"'
        return AuthOutcome(None, error_answer(
            400, "invalid_request", message, request_id=request_id, details={"reason": reason},
            headers={"WWW-Authenticate": header}), AuthResult.UNAUTHENTICATED, reason)
