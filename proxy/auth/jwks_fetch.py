"""The fetcher: one JWKS fetch for one issuer (OIDC discovery, the GET, parsing and importing keys).

Shaped after Envoy's jwt_authn one-shot JwksFetcher: it fetches once when
asked and keeps no schedule; `jwks_refresh.py` decides when. The only state it
keeps is the jwks_uri found by discovery, forgotten when that URI stops
answering.

    fetcher = JwksFetcher(issuer_cfg, FetchSettings.from_auth(cfg.auth), session)
    fetched = await fetcher.fetch(store_entry.imported)   # JwksFetchError on failure
    store_entry.set_keys(fetched.keys, fetched.ttl_s)

Keys are imported with joserfc once per fetch, and an unchanged JWK keeps the
key imported last time, so verification never re-parses key material and
cached verdicts tied to a key stay valid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from ..settings.config import HMAC_ALGORITHMS, AuthConfig, IssuerConfig
from .jwks_store import Imported

log = logging.getLogger("proxy.jwks")

# A JWKS is a few KiB; anything near this is a misconfigured URL or an attack.
MAX_DOCUMENT_BYTES = 1024 * 1024
# Below this an RSA key is forgeable in practice; an IdP publishing one is misconfigured.
MIN_RSA_BITS = 2048
_SIGNING_CURVES_OKP = frozenset({"Ed25519", "Ed448"})
_PUBLIC_KTYS = frozenset({"RSA", "EC", "OKP"})


class FetchErrorKind(StrEnum):
    """Why a fetch failed; machine-readable for metrics and logs."""

    CONNECTION = "connection"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"
    BAD_JSON = "bad_json"
    BAD_DOCUMENT = "bad_document"
    NO_USABLE_KEYS = "no_usable_keys"
    DISCOVERY = "discovery"
    INTERNAL = "internal"


class JwksFetchError(Exception):
    """One fetch of the JWKS (or the discovery document) failed."""

    def __init__(self, issuer: str, kind: FetchErrorKind, detail: str) -> None:
        super().__init__(f"JWKS for {issuer}: {detail}")
        self.issuer = issuer
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FetchSettings:
    timeout_s: float        # one request, whole (auth.jwks_fetch_timeout_s)
    default_ttl_s: float    # when the IdP sends no max-age (auth.jwks_cache_ttl_s)
    min_ttl_s: float        # an IdP's max-age is clamped into [min_ttl_s, max_ttl_s]
    max_ttl_s: float

    @classmethod
    def from_auth(cls, auth: AuthConfig) -> FetchSettings:
        return cls(timeout_s=auth.jwks_fetch_timeout_s, default_ttl_s=auth.jwks_cache_ttl_s,
                   min_ttl_s=auth.jwks_min_ttl_s, max_ttl_s=auth.jwks_max_ttl_s)


@dataclass(frozen=True, slots=True)
class FetchedJwks:
    keys: dict[str | None, Imported]    # the usable keys by kid (None: the sole kid-less key)
    ttl_s: float                        # how long they are fresh


class JwksFetcher:
    def __init__(self, issuer: IssuerConfig, settings: FetchSettings,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.config = issuer
        self.issuer = issuer.issuer
        self._settings = settings
        # Usually bound later (JwksRegistry.start): a ClientSession needs a running loop.
        self.session = session
        self.asym_algs = tuple(a for a in issuer.algorithms if a not in HMAC_ALGORITHMS)
        self._discovered_uri: str | None = None

    async def fetch(self, previous: Mapping[str | None, Imported] = {}) -> FetchedJwks:  # noqa: B006 (read only)
        """Fetches and parses the issuer's JWKS once; raises JwksFetchError."""
        uri = await self._jwks_uri()
        try:
            doc, cache_control = await self._get_json(uri)
        except JwksFetchError as err:
            if err.kind is FetchErrorKind.HTTP_STATUS:
                self._discovered_uri = None  # maybe the IdP moved it: rediscover next time
            raise
        return self.parse(doc, previous, cache_control)

    def parse(self, doc: Any, previous: Mapping[str | None, Imported] = {},  # noqa: B006 (read only)
              cache_control: str | None = None) -> FetchedJwks:
        """The usable keys of a JWKS document; JwksFetchError if it holds none."""
        return FetchedJwks(self._usable_keys(doc, previous), self._ttl(cache_control))

    async def _jwks_uri(self) -> str:
        if self.config.jwks_uri:
            return self.config.jwks_uri
        if self._discovered_uri:
            return self._discovered_uri
        doc, _ = await self._get_json(self.config.discovery)
        if not isinstance(doc, dict):
            raise JwksFetchError(self.issuer, FetchErrorKind.DISCOVERY, "discovery document is not a JSON object")
        # OIDC Discovery 4.3: a document for another issuer must not supply our keys.
        if doc.get("issuer") != self.issuer:
            raise JwksFetchError(self.issuer, FetchErrorKind.DISCOVERY,
                                 f"discovery document names issuer {str(doc.get('issuer'))[:200]!r}")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise JwksFetchError(self.issuer, FetchErrorKind.DISCOVERY, "discovery document has no http(s) jwks_uri")
        self._discovered_uri = uri
        return uri

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        if self.session is None:
            raise JwksFetchError(self.issuer, FetchErrorKind.INTERNAL,
                                 "no HTTP session bound (JwksRegistry.start not called)")
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
        try:
            async with self.session.get(url, timeout=timeout,
                                         headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise JwksFetchError(self.issuer, FetchErrorKind.HTTP_STATUS, f"GET {url} returned {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise JwksFetchError(self.issuer, FetchErrorKind.BAD_DOCUMENT,
                                             f"GET {url}: body exceeds {MAX_DOCUMENT_BYTES} bytes")
                cache_control = resp.headers.get("Cache-Control")
        except TimeoutError:
            raise JwksFetchError(self.issuer, FetchErrorKind.TIMEOUT,
                                 f"GET {url} timed out after {self._settings.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise JwksFetchError(self.issuer, FetchErrorKind.CONNECTION,
                                 f"GET {url}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(body), cache_control
        except ValueError:
            raise JwksFetchError(self.issuer, FetchErrorKind.BAD_JSON, f"GET {url}: body is not JSON") from None

    def _usable_keys(self, doc: Any, previous: Mapping[str | None, Imported]) -> dict[str | None, Imported]:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise JwksFetchError(self.issuer, FetchErrorKind.BAD_DOCUMENT, "JWKS has no 'keys' list")
        found: dict[str | None, Imported] = {}
        kidless: list[Imported] = []
        for jwk in doc["keys"]:
            key = self._import(jwk, previous)
            if key is None:
                continue
            kid = jwk.get("kid")
            if kid is None:
                kidless.append((jwk, key))
            elif kid not in found:  # a token cannot tell duplicates apart: first wins
                found[kid] = (jwk, key)
        # A key without kid can only be chosen when there is nothing to choose between.
        if not found and len(kidless) == 1:
            found[None] = kidless[0]
        if not found:
            raise JwksFetchError(self.issuer, FetchErrorKind.NO_USABLE_KEYS,
                                 f"none of {len(doc['keys'])} JWKS keys is usable for "
                                 f"{', '.join(self.asym_algs)}")
        return found

    def _import(self, jwk: Any, previous: Mapping[str | None, Imported]) -> Key | None:
        """The joserfc key for one JWK, or None if it cannot verify our tokens."""
        if not isinstance(jwk, dict):
            return None
        kid = jwk.get("kid")
        ops = jwk.get("key_ops")
        if (jwk.get("use", "sig") != "sig"
                or (kid is not None and not isinstance(kid, str))
                or (ops is not None and (not isinstance(ops, list) or "verify" not in ops))
                # A symmetric key in a public document is no secret; never an HMAC key.
                or jwk.get("kty") not in _PUBLIC_KTYS):
            return None
        known = previous.get(kid)
        if known is not None and known[0] == jwk:
            return known[1]
        try:
            key = JWKRegistry.import_key(jwk)
        except Exception as exc:  # whatever joserfc cannot import is simply not usable
            log.info("JWKS for %s: skipping key %r: %s", self.issuer, kid, exc)
            return None
        if key.is_private:
            # Private material on a public URL means anyone can mint tokens with it.
            log.warning("JWKS for %s publishes private key material (kid %r); key ignored",
                        self.issuer, kid)
            return None
        if isinstance(key, RSAKey) and key.public_key.key_size < MIN_RSA_BITS:
            return None
        if isinstance(key, OKPKey) and key.curve_name not in _SIGNING_CURVES_OKP:
            return None
        if not any(_fits(alg, key) for alg in self.asym_algs):
            return None
        return key

    def _ttl(self, cache_control: str | None) -> float:
        max_age = _max_age(cache_control)
        if max_age is None:
            return self._settings.default_ttl_s
        return min(max(max_age, self._settings.min_ttl_s), self._settings.max_ttl_s)


def _fits(alg: str, key: Key) -> bool:
    """Whether joserfc would accept `key` for `alg` (kty, curve, use and the key's own alg)."""
    model = JWSRegistry.algorithms.get(alg)
    if model is None:
        return False
    try:
        model.check_key(key)
    except JoseError:
        return False
    return True


def _max_age(cache_control: str | None) -> float | None:
    if not cache_control:
        return None
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            return 0.0  # clamped up to jwks_min_ttl_s: we must cache something
        if name == "max-age":
            value = value.strip().strip('"')
            if value.isdigit():
                return float(value)
    return None
