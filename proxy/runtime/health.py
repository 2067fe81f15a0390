"""The gateway's own `/v1/health`, `/v1/version` and probe state.

`/v1/health` reports the coordinator behind the gateway. The probe result is
cached for a second and shared by concurrent callers, so a flood of health
checks costs the coordinator one request a second at most.

    probe = CoordinatorProbe(upstream, clock)
    body = await probe.health()        # ARP Health, always schema-valid
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp

from .. import __version__
from ..settings.config import UpstreamConfig
from ..util.clock import Clock
from ..util.singleflight import SingleFlight

SERVICE_NAME = "arp-run-gateway"
PROBE_TTL_S = 1.0


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def version_info() -> dict[str, Any]:
    return {"service_name": SERVICE_NAME, "service_version": __version__, "supported_api_versions": ["v1"]}


class CoordinatorProbe:
    """The coordinator's `GET /v1/health`, for the gateway's `/v1/health` and the ops listener's
    `/readyz/coordinator`. Each probe yields the ARP Health check and whether the coordinator is ready:
    it answered HTTP 200 with status `ok` or `degraded`."""

    def __init__(self, upstream: UpstreamConfig, clock: Clock, ttl_s: float = PROBE_TTL_S) -> None:
        self._url = upstream.url
        self._timeout = aiohttp.ClientTimeout(total=upstream.health_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        # The coordinator pool's TLS context, when upstream.tls names files (set by the runtime).
        self.ssl_context: Callable[[], ssl.SSLContext] | None = None
        self._server_name = upstream.tls.server_name
        self._clock = clock
        self._ttl = ttl_s
        self._cached: tuple[float, tuple[dict[str, Any], bool]] | None = None
        self._flight: SingleFlight[str, tuple[dict[str, Any], bool]] = SingleFlight()

    def start(self) -> None:
        """Opens the probe's own client session (the data plane has no aiohttp in it)."""
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def health(self) -> dict[str, Any]:
        check, _ = await self._check()
        return {"status": check["status"], "time": rfc3339(self._clock.time()), "checks": [check]}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether the coordinator can take work now, and the check that says so."""
        check, ready = await self._check()
        return ready, check

    async def _check(self) -> tuple[dict[str, Any], bool]:
        now = self._clock.monotonic()
        if self._cached is not None and now - self._cached[0] < self._ttl:
            return self._cached[1]
        return await self._flight.do("coordinator", self._probe_and_keep)

    async def _probe_and_keep(self) -> tuple[dict[str, Any], bool]:
        result = await self._probe()
        self._cached = (self._clock.monotonic(), result)
        return result

    async def _probe(self) -> tuple[dict[str, Any], bool]:
        check = await self._probe_check()
        return check, check["status"] in ("ok", "degraded") and "message" not in check

    async def _probe_check(self) -> dict[str, Any]:
        name = "run_coordinator"
        if self._url is None or self._session is None:
            return {"name": name, "status": "down", "message": "run_coordinator_missing: no upstream.url"}
        try:
            tls: dict[str, Any] = {}
            if self.ssl_context is not None:
                tls["ssl"] = self.ssl_context()
            if self._server_name is not None:
                tls["server_hostname"] = self._server_name
            async with self._session.get(self._url + "/v1/health", **tls) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return {"name": name, "status": "down", "message": f"unreachable: {type(exc).__name__}"}
        if body is None:
            return {"name": name, "status": "degraded", "message": f"health answered HTTP {resp.status}"}
        status = body.get("status") if isinstance(body, dict) else None
        if status not in ("ok", "degraded", "down"):
            return {"name": name, "status": "degraded", "message": "health body is not an ARP Health"}
        return {"name": name, "status": status}
