"""The refresh scheduler: when each issuer's keys are fetched, and the wiring of store, fetcher and scheduler.

Shaped after Envoy's jwt_authn JwksAsyncFetcher (jwks_async_fetcher.cc): it
only schedules. The keys live in `jwks_store.py`; one fetch is `jwks_fetch.py`.
Per issuer it refreshes in the background before the keys' TTL ends, backs off
with full jitter after failures, and refetches on an unknown `kid` at most
once per cooldown; concurrent callers share one fetch.

    registry = JwksRegistry(cfg.auth, SystemClock())
    await registry.start(session)           # never raises: a down IdP only means "not ready"

    keys = registry.find_by_issuer(unverified_iss)       # the store entry; None -> issuer_mismatch
    key = keys.find_key(kid) if keys.ready else None     # hot path: a dict lookup
    if key is None:
        key = await registry.refresher(keys.issuer).refresh_for_unknown_kid(kid)  # KeysUnavailable -> 503
    ...
    await registry.close()
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from joserfc.jwk import Key

from ..settings.config import AuthConfig
from ..util.backoff import full_jitter
from ..util.clock import Clock
from ..util.singleflight import SingleFlight
from .jwks_fetch import FetchErrorKind, FetchSettings, JwksFetcher, JwksFetchError
from .jwks_store import Imported, IssuerKeys, JwksStore, KeysUnavailable, StoreSettings

log = logging.getLogger("proxy.jwks")

FetchHook = Callable[[str, float], None]
Sleep = Callable[[float], Awaitable[Any]]

# Refresh before the TTL ends so a slow IdP never leaves us on expired keys.
REFRESH_AT_FRACTION = 0.9
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
LOOP_ERROR_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    refetch_cooldown_s: float               # one unknown-kid refetch per cooldown (auth.jwks_refetch_cooldown_s)
    backoff_base_s: float = BACKOFF_BASE_S  # full-jitter backoff after failed fetches: the first cap
    backoff_max_s: float = BACKOFF_MAX_S    # and the largest
    refresh_at_fraction: float = REFRESH_AT_FRACTION  # refresh when this share of the TTL has passed

    @classmethod
    def from_auth(cls, auth: AuthConfig) -> RefreshSettings:
        return cls(refetch_cooldown_s=auth.jwks_refetch_cooldown_s)


class RefreshScheduler:
    """Keeps one issuer's store entry fresh with its fetcher; counts fetches for /metrics."""

    def __init__(
        self,
        keys: IssuerKeys,
        fetcher: JwksFetcher,
        settings: RefreshSettings,
        clock: Clock,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_fetch: FetchHook | None = None,
    ) -> None:
        self.keys = keys
        self.fetcher = fetcher
        self.issuer = keys.issuer
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.on_fetch = on_fetch

        self._flight: SingleFlight[str, None] = SingleFlight()
        self._refresh_at: float | None = None
        self._failures = 0
        self._last_refetch: float | None = None
        self._next_attempt_at: float | None = None
        self._last_loop_error: float | None = None

        self.last_error: str | None = None
        self.fetches_ok = 0
        self.fetches_failed = 0
        self.refetch_suppressed = 0

    # ------------------------------------------------------------------ refreshing

    async def refresh(self) -> None:
        """Fetches now, or joins the fetch already in flight; raises JwksFetchError on failure."""
        if not self.keys.needs_fetch:
            return
        await self._flight.do(self.issuer, self._fetch_and_record, name=f"jwks-fetch:{self.issuer}")

    async def refresh_for_unknown_kid(self, kid: str | None) -> Key | None:
        """The key for `kid`, refetching at most once per cooldown if it is unknown.

        Concurrent callers share one fetch. Raises KeysUnavailable when, after this,
        the issuer still has no usable keys; returns None when the keys are fine but
        none has this kid.
        """
        keys = self.keys
        if not keys.needs_fetch:
            return None
        if keys.ready and (key := keys.find_key(kid)) is not None:
            return key
        if self._flight.in_flight(self.issuer):
            await self._refresh_quietly()
        else:
            now = self._clock.monotonic()
            cooldown = self._settings.refetch_cooldown_s
            if self._last_refetch is not None and now - self._last_refetch < cooldown:
                # A flood of made-up kids must not turn into a flood of IdP requests.
                self.refetch_suppressed += 1
            else:
                self._last_refetch = now
                await self._refresh_quietly()
        if not keys.ready:
            raise KeysUnavailable(self.issuer, self.retry_after_s())
        return keys.find_key(kid)

    def next_refresh_delay(self) -> float:
        """Seconds until the background loop should fetch again."""
        if self._failures:
            # Full jitter: many gateway workers retrying a recovering IdP spread out.
            return full_jitter(self._failures, self._settings.backoff_base_s, self._settings.backoff_max_s,
                               self._rng)
        if self._refresh_at is None:
            return 0.0
        return max(0.0, self._refresh_at - self._clock.monotonic())

    def retry_after_s(self) -> int:
        """A Retry-After hint for 503s: when the next fetch attempt can happen."""
        now = self._clock.monotonic()
        waits = []
        if self._last_refetch is not None:
            waits.append(self._last_refetch + self._settings.refetch_cooldown_s - now)
        if self._next_attempt_at is not None:
            waits.append(self._next_attempt_at - now)
        wait = min(waits) if waits else self._settings.backoff_base_s
        return max(1, math.ceil(wait))

    async def run(self) -> None:
        """The background refresh loop; cancel the task to stop it."""
        if not self.keys.needs_fetch:
            return
        while True:
            delay = self.next_refresh_delay()
            self._next_attempt_at = self._clock.monotonic() + delay
            await self._sleep(delay)
            try:
                await self._refresh_quietly()
            except Exception:
                # A bug past the fetch (installing the keys, say) must not end the loop: this issuer
                # would never be refreshed again. Counted as a failure, so the loop backs off.
                self._failures += 1
                self.fetches_failed += 1
                now = self._clock.monotonic()
                if self._last_loop_error is None or now - self._last_loop_error >= LOOP_ERROR_LOG_INTERVAL_S:
                    self._last_loop_error = now
                    log.exception("JWKS refresh loop iteration failed for %s", self.issuer)

    async def close(self) -> None:
        await self._flight.cancel()

    def set_remote_jwks(self, doc: Any, ttl_s: float | None = None) -> None:
        """Installs a JWKS document exactly as a successful fetch would (Envoy's setRemoteJwks):
        for preloading keys and for benchmarks; JwksFetchError if it holds no usable key."""
        fetched = self.fetcher.parse(doc, self.keys.imported)
        self._install(fetched.keys, ttl_s or fetched.ttl_s, self._clock.monotonic())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except JwksFetchError:
            pass  # recorded in last_error / fetches_failed; callers decide on `ready`

    async def _fetch_and_record(self) -> None:
        started = self._clock.monotonic()
        try:
            fetched = await self.fetcher.fetch(self.keys.imported)
        except JwksFetchError as err:
            self._record_failure(err, started)
            raise
        except Exception as exc:  # a bug must not kill the refresh loop
            log.exception("unexpected error fetching JWKS for %s", self.issuer)
            failure = JwksFetchError(self.issuer, FetchErrorKind.INTERNAL, type(exc).__name__)
            self._record_failure(failure, started)
            raise failure from exc
        self._install(fetched.keys, fetched.ttl_s, started)

    def _install(self, source: dict[str | None, Imported], ttl: float, started: float) -> None:
        now = self._clock.monotonic()
        self.keys.set_keys(source, ttl)
        self._refresh_at = now + ttl * self._settings.refresh_at_fraction
        self._failures = 0
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
                                                "serving_keys": self.keys.keys_count if self.keys.ready else 0})
        self._notify(err.kind, self._clock.monotonic() - started)

    def _notify(self, result: str, duration_s: float) -> None:
        if self.on_fetch is not None:
            try:
                self.on_fetch(result, duration_s)
            except Exception:
                log.exception("on_fetch hook failed")


class JwksRegistry:
    """Per configured issuer a store entry, a fetcher and a refresh scheduler, each given its own settings."""

    def __init__(
        self,
        auth: AuthConfig,
        clock: Clock,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_fetch: FetchHook | None = None,
    ) -> None:
        self.store = JwksStore(auth.issuers, StoreSettings.from_auth(auth), clock)
        fetch = FetchSettings.from_auth(auth)
        refresh = RefreshSettings.from_auth(auth)
        self._refreshers = {
            keys.issuer: RefreshScheduler(keys, JwksFetcher(keys.config, fetch), refresh, clock,
                                          sleep=sleep, rng=rng, on_fetch=on_fetch)
            for keys in self.store
        }
        self._tasks: list[asyncio.Task[None]] = []

    def find_by_issuer(self, iss: str) -> IssuerKeys | None:
        return self.store.find_by_issuer(iss)

    def refresher(self, iss: str) -> RefreshScheduler:
        return self._refreshers[iss]

    def __iter__(self) -> Iterator[RefreshScheduler]:
        return iter(self._refreshers.values())

    def __len__(self) -> int:
        return len(self._refreshers)

    @property
    def ready(self) -> bool:
        return self.store.ready

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Binds the HTTP session, fetches every issuer at once, then runs one refresh loop each.

        Never raises for a down IdP: the gateway must start and answer 503 until keys
        arrive (the loops keep retrying with backoff). The session stays the caller's
        to close, after close().
        """
        for refresher in self:
            refresher.fetcher.session = session
        fetching = [r for r in self if r.keys.needs_fetch]
        await asyncio.gather(*(r.refresh() for r in fetching), return_exceptions=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(r.run(), name=f"jwks-refresh:{r.issuer}") for r in fetching]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self))
