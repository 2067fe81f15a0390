"""Per-issuer JWKS cache: fetch, keep, refresh and rotate the keys that verify tokens.

Shaped after Envoy's jwt_authn JwksCache: one key set per configured issuer, looked
up by the (unverified) `iss` of a token, refreshed in the background, refetched on
an unknown `kid` at most once per cooldown.

    registry = JwksRegistry(cfg.auth, SystemClock())
    await registry.start(session)           # never raises: a down IdP only means "not ready"

    jwks = registry.find_by_issuer(unverified_iss)      # None -> issuer_mismatch
    key = jwks.find_key(kid) if jwks.ready else None    # hot path: a dict lookup
    if key is None:
        key = await jwks.refresh_for_unknown_kid(kid)   # KeysUnavailable -> 503
    ...
    await registry.close()

Keys are imported with joserfc once per fetch (and reused across fetches while the
JWK is unchanged), so verification never re-parses key material.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from .clock import Clock
from .config import HMAC_ALGORITHMS, AuthConfig, IssuerConfig

log = logging.getLogger(__name__)

FetchHook = Callable[[str, float], None]
Sleep = Callable[[float], Awaitable[Any]]

# A JWKS is a few KiB; anything near this is a misconfigured URL or an attack.
MAX_DOCUMENT_BYTES = 1024 * 1024
# Refresh before the TTL ends so a slow IdP never leaves us on expired keys.
REFRESH_AT_FRACTION = 0.9
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
# Below this an RSA key is forgeable in practice; an IdP publishing one is misconfigured.
MIN_RSA_BITS = 2048
_SIGNING_CURVES_OKP = frozenset({"Ed25519", "Ed448"})
_PUBLIC_KTYS = frozenset({"RSA", "EC", "OKP"})


class JwksFetchError(Exception):
    """One fetch of the JWKS (or the discovery document) failed.

    `kind` is machine-readable for metrics: connection, timeout, http_status,
    bad_json, bad_document, no_usable_keys, discovery, internal.
    """

    def __init__(self, issuer: str, kind: str, detail: str) -> None:
        super().__init__(f"JWKS for {issuer}: {detail}")
        self.issuer = issuer
        self.kind = kind
        self.detail = detail


class KeysUnavailable(Exception):
    """No usable keys for this issuer: never fetched, or staler than jwks_max_stale_s.

    Not a token problem: the gateway answers 503 auth_unavailable with Retry-After.
    """

    def __init__(self, issuer: str, retry_after_s: int) -> None:
        super().__init__(f"no usable signing keys for issuer {issuer}")
        self.issuer = issuer
        self.retry_after_s = retry_after_s


# A fetched, usable JWK: the JSON it came from (to reuse the import when unchanged) and the key.
_Imported = tuple[dict[str, Any], Key]


class IssuerJwks:
    """The signing keys of one issuer, and the policy for keeping them fresh."""

    def __init__(
        self,
        issuer: IssuerConfig,
        auth: AuthConfig,
        clock: Clock,
        *,
        session: aiohttp.ClientSession | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_fetch: FetchHook | None = None,
    ) -> None:
        self.config = issuer
        self.issuer = issuer.issuer
        self._auth = auth
        # Usually bound later by JwksRegistry.start(): a ClientSession needs a running loop.
        self.session = session
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.on_fetch = on_fetch

        self._asym_algs = tuple(a for a in issuer.algorithms if a not in HMAC_ALGORITHMS)
        # The configured secret is the only HMAC key there is: keys from a JWKS are
        # public, so none of them may ever act as an HMAC secret.
        self.hmac_key: OctKey | None = None
        if issuer.hmac_secret and len(self._asym_algs) < len(issuer.algorithms):
            self.hmac_key = OctKey.import_key(issuer.hmac_secret.encode())
        self.needs_fetch = bool(self._asym_algs)

        self._source: dict[str | None, _Imported] = {}
        self._keys: dict[str, Key] = {}
        self._sole: Key | None = None
        self._discovered_uri: str | None = None

        self._inflight: asyncio.Task[None] | None = None
        self._last_success_mono: float | None = None
        self._expires_at: float | None = None
        self._refresh_at: float | None = None
        self._failures = 0
        self._last_refetch: float | None = None
        self._next_attempt_at: float | None = None

        self.last_success: float | None = None     # wall time, for logs and /metrics
        self.last_error: str | None = None
        self.fetches_ok = 0
        self.fetches_failed = 0
        self.refetch_suppressed = 0

    # ------------------------------------------------------------------ lookups

    def find_key(self, kid: str | None) -> Key | None:
        """The key for `kid`; a token without kid gets the key only if the set has exactly one."""
        if kid is None:
            return self._sole
        return self._keys.get(kid)

    def has_kid(self, kid: str | None) -> bool:
        return self.find_key(kid) is not None

    @property
    def keys_count(self) -> int:
        return len(self._source)

    def is_expired(self) -> bool:
        """The TTL has passed: time to refetch (the keys are still served until max-stale)."""
        if not self.needs_fetch:
            return False
        return self._expires_at is None or self._clock.monotonic() >= self._expires_at

    @property
    def ready(self) -> bool:
        """Has usable keys that are not older than jwks_max_stale_s."""
        if not self.needs_fetch:
            return True
        if self._last_success_mono is None:
            return False
        return self._clock.monotonic() - self._last_success_mono <= self._auth.jwks_max_stale_s

    # ------------------------------------------------------------------ refreshing

    async def refresh(self) -> None:
        """Fetches now, or joins the fetch already in flight; raises JwksFetchError on failure."""
        if not self.needs_fetch:
            return
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_record(), name=f"jwks-fetch:{self.issuer}")
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        # Shielded: one caller giving up (client disconnect) must not cancel the
        # fetch the other waiters share.
        await asyncio.shield(task)

    async def refresh_for_unknown_kid(self, kid: str | None) -> Key | None:
        """The key for `kid`, refetching at most once per cooldown if it is unknown.

        Concurrent callers share one fetch. Raises KeysUnavailable when, after this,
        the issuer still has no usable keys; returns None when the keys are fine but
        none has this kid.
        """
        if not self.needs_fetch:
            return None
        if self.ready and (key := self.find_key(kid)) is not None:
            return key
        if self._inflight is not None:
            await self._refresh_quietly()
        else:
            now = self._clock.monotonic()
            cooldown = self._auth.jwks_refetch_cooldown_s
            if self._last_refetch is not None and now - self._last_refetch < cooldown:
                # A flood of made-up kids must not turn into a flood of IdP requests.
                self.refetch_suppressed += 1
            else:
                self._last_refetch = now
                await self._refresh_quietly()
        if not self.ready:
            raise KeysUnavailable(self.issuer, self.retry_after_s())
        return self.find_key(kid)

    def next_refresh_delay(self) -> float:
        """Seconds until the background loop should fetch again."""
        if self._failures:
            # Full jitter: many gateway workers retrying a recovering IdP spread out.
            cap = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(self._failures - 1, 16))
            return self._rng.uniform(0.0, cap)
        if self._refresh_at is None:
            return 0.0
        return max(0.0, self._refresh_at - self._clock.monotonic())

    def retry_after_s(self) -> int:
        """A Retry-After hint for 503s: when the next fetch attempt can happen."""
        now = self._clock.monotonic()
        waits = []
        if self._last_refetch is not None:
            waits.append(self._last_refetch + self._auth.jwks_refetch_cooldown_s - now)
        if self._next_attempt_at is not None:
            waits.append(self._next_attempt_at - now)
        wait = min(waits) if waits else BACKOFF_BASE_S
        return max(1, math.ceil(wait))

    async def run(self) -> None:
        """The background refresh loop; cancel the task to stop it."""
        if not self.needs_fetch:
            return
        while True:
            delay = self.next_refresh_delay()
            self._next_attempt_at = self._clock.monotonic() + delay
            await self._sleep(delay)
            await self._refresh_quietly()

    async def close(self) -> None:
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except JwksFetchError:
            pass  # recorded in last_error / fetches_failed; callers decide on `ready`

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here so a fetch nobody awaited does not log noise

    async def _fetch_and_record(self) -> None:
        started = self._clock.monotonic()
        try:
            source, ttl = await self._fetch()
        except JwksFetchError as err:
            self._record_failure(err, started)
            raise
        except Exception as exc:  # a bug must not kill the refresh loop
            log.exception("unexpected error fetching JWKS for %s", self.issuer)
            err = JwksFetchError(self.issuer, "internal", type(exc).__name__)
            self._record_failure(err, started)
            raise err from exc
        self._install(source, ttl, started)

    def set_remote_jwks(self, doc: Any, ttl_s: float | None = None) -> None:
        """Installs a JWKS document exactly as a successful fetch would (Envoy's setRemoteJwks):
        for preloading keys and for benchmarks; JwksFetchError if it holds no usable key."""
        self._install(self._usable_keys(doc), ttl_s or self._auth.jwks_cache_ttl_s, self._clock.monotonic())

    def _install(self, source: dict[str | None, _Imported], ttl: float, started: float) -> None:
        now = self._clock.monotonic()
        self._source = source
        self._keys = {kid: key for kid, (_, key) in source.items() if kid is not None}
        self._sole = next(iter(source.values()))[1] if len(source) == 1 else None
        self._last_success_mono = now
        self._expires_at = now + ttl
        self._refresh_at = now + ttl * REFRESH_AT_FRACTION
        self._failures = 0
        self.last_success = self._clock.time()
        self.last_error = None
        self.fetches_ok += 1
        log.info("JWKS refreshed", extra={"event": "jwks_refresh", "issuer": self.issuer,
                                          "keys": len(source), "kids": sorted(k for k in source if k),
                                          "ttl_s": round(ttl, 1)})
        self._notify("ok", now - started)

    def _record_failure(self, err: JwksFetchError, started: float) -> None:
        self._failures += 1
        self.fetches_failed += 1
        self.last_error = err.detail
        log.warning("JWKS fetch failed", extra={"event": "jwks_refresh_failed", "issuer": self.issuer,
                                                "kind": err.kind, "detail": err.detail,
                                                "serving_keys": len(self._source) if self.ready else 0})
        self._notify(err.kind, self._clock.monotonic() - started)

    def _notify(self, result: str, duration_s: float) -> None:
        if self.on_fetch is not None:
            try:
                self.on_fetch(result, duration_s)
            except Exception:
                log.exception("on_fetch hook failed")

    # ------------------------------------------------------------------ fetching

    async def _fetch(self) -> tuple[dict[str | None, _Imported], float]:
        uri = await self._jwks_uri()
        try:
            doc, cache_control = await self._get_json(uri)
        except JwksFetchError as err:
            if err.kind == "http_status":
                self._discovered_uri = None  # maybe the IdP moved it: rediscover next time
            raise
        return self._usable_keys(doc), self._ttl(cache_control)

    async def _jwks_uri(self) -> str:
        if self.config.jwks_uri:
            return self.config.jwks_uri
        if self._discovered_uri:
            return self._discovered_uri
        doc, _ = await self._get_json(self.config.discovery)
        if not isinstance(doc, dict):
            raise JwksFetchError(self.issuer, "discovery", "discovery document is not a JSON object")
        # OIDC Discovery 4.3: a document for another issuer must not supply our keys.
        if doc.get("issuer") != self.issuer:
            raise JwksFetchError(self.issuer, "discovery",
                                 f"discovery document names issuer {str(doc.get('issuer'))[:200]!r}")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise JwksFetchError(self.issuer, "discovery", "discovery document has no http(s) jwks_uri")
        self._discovered_uri = uri
        return uri

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        if self.session is None:
            raise JwksFetchError(self.issuer, "internal", "no HTTP session bound (JwksRegistry.start not called)")
        timeout = aiohttp.ClientTimeout(total=self._auth.jwks_fetch_timeout_s)
        try:
            async with self.session.get(url, timeout=timeout,
                                         headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise JwksFetchError(self.issuer, "http_status", f"GET {url} returned {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise JwksFetchError(self.issuer, "bad_document",
                                             f"GET {url}: body exceeds {MAX_DOCUMENT_BYTES} bytes")
                cache_control = resp.headers.get("Cache-Control")
        except TimeoutError:
            raise JwksFetchError(self.issuer, "timeout",
                                 f"GET {url} timed out after {self._auth.jwks_fetch_timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise JwksFetchError(self.issuer, "connection", f"GET {url}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(body), cache_control
        except ValueError:
            raise JwksFetchError(self.issuer, "bad_json", f"GET {url}: body is not JSON") from None

    def _usable_keys(self, doc: Any) -> dict[str | None, _Imported]:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise JwksFetchError(self.issuer, "bad_document", "JWKS has no 'keys' list")
        found: dict[str | None, _Imported] = {}
        kidless: list[_Imported] = []
        for jwk in doc["keys"]:
            key = self._import(jwk)
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
            raise JwksFetchError(self.issuer, "no_usable_keys",
                                 f"none of {len(doc['keys'])} JWKS keys is usable for "
                                 f"{', '.join(self._asym_algs)}")
        return found

    def _import(self, jwk: Any) -> Key | None:
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
        previous = self._source.get(kid)
        if previous is not None and previous[0] == jwk:
            return previous[1]
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
        if not any(_fits(alg, key) for alg in self._asym_algs):
            return None
        return key

    def _ttl(self, cache_control: str | None) -> float:
        max_age = _max_age(cache_control)
        if max_age is None:
            return self._auth.jwks_cache_ttl_s
        return min(max(max_age, self._auth.jwks_min_ttl_s), self._auth.jwks_max_ttl_s)


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


class JwksRegistry:
    """One IssuerJwks per configured issuer, found by exact `iss` string."""

    def __init__(
        self,
        auth: AuthConfig,
        clock: Clock,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_fetch: FetchHook | None = None,
    ) -> None:
        self._by_issuer = {
            i.issuer: IssuerJwks(i, auth, clock, sleep=sleep, rng=rng, on_fetch=on_fetch)
            for i in auth.issuers
        }
        self._tasks: list[asyncio.Task[None]] = []

    def find_by_issuer(self, iss: str) -> IssuerJwks | None:
        return self._by_issuer.get(iss)

    def __iter__(self) -> Iterator[IssuerJwks]:
        return iter(self._by_issuer.values())

    def __len__(self) -> int:
        return len(self._by_issuer)

    @property
    def ready(self) -> bool:
        return all(j.ready for j in self._by_issuer.values())

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Binds the HTTP session, fetches every issuer at once, then runs one refresh loop each.

        Never raises for a down IdP: the gateway must start and answer 503 until keys
        arrive (the loops keep retrying with backoff). The session stays the caller's
        to close, after close().
        """
        for jwks in self:
            jwks.session = session
        await asyncio.gather(*(j.refresh() for j in self if j.needs_fetch), return_exceptions=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(j.run(), name=f"jwks-refresh:{j.issuer}")
                       for j in self if j.needs_fetch]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(j.close() for j in self))
