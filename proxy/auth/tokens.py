"""Bearer-token verification: a compact JWS in, a Principal out, or a typed reason why not.

    verifier = TokenVerifier(cfg.auth, registry, SystemClock())    # registry: jwks_refresh.JwksRegistry
    principal = verifier.verify(token)   # the Principal now when a cached verdict stands, else a coroutine
    try:
        if not isinstance(principal, Principal):
            principal = await principal
    except TokenError as exc:        # 401; details.reason = exc.reason, message = exc.description
        ...
    except KeysUnavailable as exc:   # 503 auth_unavailable; Retry-After: exc.retry_after_s
        ...

Order of checks: size, shape and header (no key needed, so junk costs nothing and
cannot trigger a JWKS fetch), then the unverified `iss` only to pick that issuer's
keys and policy, then the signature (joserfc, with exactly the header's alg), then
the claims against that issuer's policy and the injected clock.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from joserfc import jws
from joserfc.errors import ExceededSizeError, InvalidKeyCurveError, JoseError, KeyParameterError
from joserfc.jwk import Key
from joserfc.jws import CompactSignature, JWSRegistry

from ..settings.config import HMAC_ALGORITHMS, SUPPORTED_ALGORITHMS, AuthConfig
from ..util.boundedcache import BoundedCache
from ..util.clock import Clock
from .jwks_refresh import JwksRegistry
from .jwks_store import IssuerKeys, KeysUnavailable
from .principal import Principal, PrincipalKind, scopes_of

__all__ = [
    "TokenVerifier", "TokenError", "MalformedToken", "TokenTooLarge", "UnsupportedAlg",
    "UnknownKey", "BadSignature", "Expired", "NotYetValid", "IssuerMismatch",
    "AudienceMismatch", "MissingClaim", "InvalidClaim", "ForbiddenHeader", "KeysUnavailable",
]

# jku/x5u would make us fetch keys from a URL the token chooses; jwk/x5c would let
# the token carry its own key. Ignoring them is legal but invites a future refactor
# to start honouring them, and no IdP we accept sends them on access tokens: reject.
# crit names extensions we would have to understand; we understand none. b64=false
# (RFC 7797) changes what is signed and has no place in a JWT.
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "x5c", "jwk", "crit", "b64"})


class TokenError(Exception):
    """The token is not acceptable (401). `description` is safe to return: never the token."""

    reason: ClassVar[str] = "invalid_token"
    description: str = "the bearer token is invalid"
    # The configured issuer the unverified token names, for counting and logging the refusal under
    # it; None when it names none (the token's own claim is never used beyond this comparison).
    issuer: str | None = None

    def __init__(self, description: str | None = None) -> None:
        if description is not None:
            self.description = description
        super().__init__(self.description)


class MalformedToken(TokenError):
    reason = "malformed"
    description = "the bearer token is not a well-formed compact JWS"


class TokenTooLarge(TokenError):
    reason = "token_too_large"
    description = "the bearer token is too large"


class UnsupportedAlg(TokenError):
    reason = "unsupported_alg"
    description = "the token's signing algorithm is not accepted for its issuer"


class UnknownKey(TokenError):
    reason = "unknown_key"
    description = "no signing key of the issuer matches the token's kid and alg"


class BadSignature(TokenError):
    reason = "bad_signature"
    description = "the token signature does not verify"


class Expired(TokenError):
    reason = "expired"
    description = "the token has expired"


class NotYetValid(TokenError):
    reason = "not_yet_valid"
    description = "the token is not valid yet"


class IssuerMismatch(TokenError):
    reason = "issuer_mismatch"
    description = "the token's issuer is not trusted"


class AudienceMismatch(TokenError):
    reason = "audience_mismatch"
    description = "the token is not meant for this service (aud)"


class MissingClaim(TokenError):
    reason = "missing_claim"

    def __init__(self, claim: str) -> None:
        self.claim = claim
        super().__init__(f"the token has no {claim!r} claim")


class InvalidClaim(TokenError):
    reason = "invalid_claim"

    def __init__(self, claim: str) -> None:
        self.claim = claim
        super().__init__(f"the token's {claim!r} claim has an invalid value")


class ForbiddenHeader(TokenError):
    reason = "forbidden_header"

    def __init__(self, name: str) -> None:
        self.header = name
        super().__init__(f"the token header parameter {name!r} is not accepted")


@dataclass(frozen=True, slots=True)
class _Policy:
    algorithms: frozenset[str]
    audiences: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Cached:
    """A verified token, and what must still hold for the verdict to stand."""

    principal: Principal
    exp: float
    keys: IssuerKeys
    kid: str | None
    key: Key
    hmac: bool


def _reject_constant(name: str) -> NoReturn:
    # NaN/Infinity are not JSON (RFC 8259) and `exp: NaN` compares false to everything.
    raise ValueError(f"non-standard JSON constant {name}")


class TokenVerifier:
    def __init__(self, auth: AuthConfig, registry: JwksRegistry, clock: Clock) -> None:
        self._registry = registry
        self._store = registry.store
        self._clock = clock
        self._max_bytes = auth.max_token_bytes
        self._skew = auth.clock_skew_s
        self._cache_size = auth.token_cache_size
        # Keyed by the token text itself: its Principal keeps the token anyway (for passthrough),
        # and str keys spare a SHA-256 per request.
        self._cache: BoundedCache[str, _Cached] = BoundedCache(auth.token_cache_size)
        self._policies = {
            i.issuer: _Policy(frozenset(i.algorithms) - {"none"}, frozenset(i.audiences))
            for i in auth.issuers
        }
        # One registry per alg so joserfc can only ever use the alg we checked; not
        # strict about headers, since unknown non-crit ones must be ignored (RFC 7515 4).
        self._parse_registry = self._jws_registry(None)
        self._alg_registries = {alg: self._jws_registry(alg) for alg in SUPPORTED_ALGORITHMS}
        self.cache_hits = 0
        self.cache_misses = 0

    def _jws_registry(self, alg: str | None) -> JWSRegistry:
        registry = JWSRegistry(algorithms=[alg] if alg else None, strict_check_header=False)
        # Our own max_token_bytes bounds the whole token; joserfc's finer limits
        # (512-byte header) would only add a second, different answer.
        registry.max_header_length = self._max_bytes
        registry.max_payload_length = self._max_bytes
        registry.max_signature_length = self._max_bytes
        return registry

    def verify(self, token: str) -> Principal | Coroutine[Any, Any, Principal]:
        """The Principal of a token: now, when a verdict cached for it stands (unexpired, and its key
        still published and fresh, or the configured HMAC secret); else the coroutine that decides,
        which gives the Principal or raises TokenError or KeysUnavailable. One stage in the
        pipeline's manner: a repeat token is answered without a coroutine."""
        entry = self._cache.get(token)
        if entry is not None:
            if self._clock.time() < entry.exp and (entry.hmac or entry.keys.find_key(entry.kid) is entry.key):
                if entry.hmac or entry.keys.ready:
                    self.cache_hits += 1
                    return entry.principal
                # Keys older than jwks_max_stale_s: a cached token gets no longer life than a new one.
                return self._unavailable(entry.keys.issuer)
            # Expired, or its key was rotated out: a revoked key must not live on here.
            self._cache.pop(token)
        return self._decide(token)

    async def _unavailable(self, issuer: str) -> NoReturn:
        raise KeysUnavailable(issuer, self._registry.refresher(issuer).retry_after_s())

    async def _decide(self, token: str) -> Principal:
        """A token with no standing verdict: its signature and claims checked, the verdict cached."""
        if token in self._cache:
            # Runs a loop turn or more after `verify` asked: a request that came first with this token
            # has verified it meanwhile, and its verdict is taken as `verify` takes any (which cannot
            # come back here: what does not stand is dropped before).
            decided = self.verify(token)
            return decided if decided.__class__ is Principal else await decided  # type: ignore[misc]
        if len(token) > self._max_bytes:
            raise TokenTooLarge()
        cached = self._cache_size > 0
        if cached:
            self.cache_misses += 1
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise MalformedToken() from None
        try:
            verified = await self._verify(token, raw)
        except TokenError as exc:
            exc.issuer = self._named_issuer(raw)
            raise
        if cached and self._clock.time() < verified.exp:
            self._cache.put(token, verified)
        return verified.principal

    async def _verify(self, token: str, raw: bytes) -> _Cached:
        obj = self._parse(raw)
        header = obj.protected
        alg = header["alg"]
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise MalformedToken("the token's kid is not a string")

        claims = self._claims(obj.payload)
        # Unverified: only used to choose whose keys to try; re-checked after the signature.
        iss = claims.get("iss")
        if iss is None:
            raise MissingClaim("iss")
        if not isinstance(iss, str):
            raise InvalidClaim("iss")
        keys = self._store.find_by_issuer(iss)
        policy = self._policies.get(iss)
        if keys is None or policy is None:
            raise IssuerMismatch()
        if alg not in policy.algorithms:
            raise UnsupportedAlg()

        hmac = alg in HMAC_ALGORITHMS
        key = self._key(keys, kid, hmac)
        if key is None:
            # KeysUnavailable propagates (503)
            key = await self._registry.refresher(iss).refresh_for_unknown_kid(kid)
            if key is None:
                raise UnknownKey()
        self._check_signature(obj, key, alg)

        if claims.get("iss") != keys.issuer:  # identical by construction; kept as the rule
            raise IssuerMismatch()
        self._check_audience(claims, policy)
        exp = self._check_times(claims)
        sub = claims.get("sub")
        if sub is None:
            raise MissingClaim("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidClaim("sub")
        principal = Principal(subject=sub, issuer=iss, scopes=scopes_of(claims), claims=claims,
                              token=token, expires_at=exp, kind=PrincipalKind.TOKEN)
        return _Cached(principal, exp, keys, kid, key, hmac)

    def _parse(self, raw: bytes) -> CompactSignature:
        try:
            # Splits, base64url-decodes and JSON-parses the header once; the signature
            # check below reuses this object instead of parsing the token again.
            obj = jws.extract_compact(raw, registry=self._parse_registry)
        except ExceededSizeError:
            raise TokenTooLarge() from None
        except (JoseError, ValueError, TypeError, KeyError):
            raise MalformedToken() from None
        header = obj.protected
        if not isinstance(header, dict):
            raise MalformedToken("the token header is not a JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise MalformedToken("the token header has no alg")
        if not _FORBIDDEN_HEADERS.isdisjoint(header):
            raise ForbiddenHeader(min(_FORBIDDEN_HEADERS.intersection(header)))
        if alg == "none" or alg not in SUPPORTED_ALGORITHMS:
            raise UnsupportedAlg()
        return obj

    def _named_issuer(self, raw: bytes) -> str | None:
        """The configured issuer whose name a refused token carries in `iss`, whatever check it
        failed: read again from the payload, since the failure may come before the claims are."""
        parts = raw.split(b".")
        if len(parts) != 3:
            return None
        try:
            claims = self._claims(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
        except (TokenError, ValueError):
            return None
        iss = claims.get("iss")
        return iss if isinstance(iss, str) and iss in self._policies else None

    @staticmethod
    def _claims(payload: bytes) -> dict[str, Any]:
        try:
            claims = json.loads(payload, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise MalformedToken("the token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise MalformedToken("the token payload is not a JSON object")
        return claims

    @staticmethod
    def _key(keys: IssuerKeys, kid: str | None, hmac: bool) -> Key | None:
        if hmac:
            # Only the configured secret; a JWKS (public) key is never an HMAC key.
            if keys.hmac_key is None:
                raise UnsupportedAlg()
            return keys.hmac_key
        return keys.find_key(kid) if keys.ready else None

    def _check_signature(self, obj: CompactSignature, key: Key, alg: str) -> None:
        try:
            ok = jws.validate_compact(obj, key, registry=self._alg_registries[alg])
        except (KeyParameterError, InvalidKeyCurveError):
            # The kid names a key of another type, curve or alg than the header claims.
            raise UnknownKey() from None
        except JoseError:
            raise MalformedToken() from None
        if not ok:
            raise BadSignature()

    @staticmethod
    def _check_audience(claims: dict[str, Any], policy: _Policy) -> None:
        aud = claims.get("aud")
        if aud is None:
            raise MissingClaim("aud")
        if isinstance(aud, str):
            matched = aud in policy.audiences
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            matched = not policy.audiences.isdisjoint(aud)
        else:
            raise InvalidClaim("aud")
        if not matched:
            raise AudienceMismatch()

    def _check_times(self, claims: dict[str, Any]) -> float:
        now = self._clock.time()
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise MissingClaim("exp")
        if now >= exp + self._skew:
            raise Expired()
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and nbf > now + self._skew:
            raise NotYetValid()
        iat = _numeric_date(claims, "iat")
        if iat is not None and iat > now + self._skew:
            raise NotYetValid("the token was issued in the future (iat)")
        return exp

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A finite NumericDate, None if absent; bools, strings, NaN and inf are invalid."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidClaim(name)
    try:
        value = float(value)
    except OverflowError:
        raise InvalidClaim(name) from None
    if not math.isfinite(value):
        raise InvalidClaim(name)
    return value
