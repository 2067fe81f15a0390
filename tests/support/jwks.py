"""A scripted stand-in for the JWKS fetcher and a scheduler over it: refresh tests on a FakeClock."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from proxy.auth.jwks_fetch import FetchedJwks, FetchErrorKind, JwksFetchError
from proxy.auth.jwks_refresh import RefreshScheduler, RefreshSettings
from proxy.auth.jwks_store import IssuerKeys, StoreSettings
from proxy.settings.config import IssuerConfig
from proxy.util.clock import FakeClock
from tests.support.keys import AUDIENCE, signer

ISSUER = "http://127.0.0.1:1/a"
SETTINGS = RefreshSettings(refetch_cooldown_s=30)


class ScriptedFetcher:
    """Stands in for JwksFetcher: answers from `script` (a kid list or a JwksFetchError kind), one per fetch."""

    def __init__(self, *script: list[str] | FetchErrorKind, ttl_s: float = 100) -> None:
        self.script = list(script)
        self.ttl_s = ttl_s
        self.calls = 0
        self.gate: asyncio.Event | None = None   # set: every fetch waits for it

    async def fetch(self, previous: Any = None) -> FetchedJwks:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, FetchErrorKind):
            raise JwksFetchError(ISSUER, step, f"scripted {step}")
        return self.parse({"keys": [signer(kid).jwk() for kid in step]})

    def parse(self, doc: Any, previous: Any = None, cache_control: str | None = None) -> FetchedJwks:
        if not doc.get("keys"):
            raise JwksFetchError(ISSUER, FetchErrorKind.NO_USABLE_KEYS, "none")
        return FetchedJwks({j["kid"]: (j, signer(j["kid"]).key) for j in doc["keys"]}, self.ttl_s)


class UpperBound(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def scheduler(clock: FakeClock, fetcher: ScriptedFetcher, **kwargs: Any) -> RefreshScheduler:
    keys = IssuerKeys(IssuerConfig(ISSUER, (AUDIENCE,)), StoreSettings(max_stale_s=600), clock)
    return RefreshScheduler(keys, fetcher, SETTINGS, clock, **kwargs)  # type: ignore[arg-type]
