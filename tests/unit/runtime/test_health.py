"""proxy/runtime/health.py: the coordinator probe behind /v1/health, against a real loopback server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.runtime.health import PROBE_TTL_S, CoordinatorProbe, rfc3339
from proxy.util.clock import FakeClock
from tests.support.gateway import gateway_config
from tests.support.process import free_port
from tests.support.servers import serve_app


class Coordinator:
    """Answers GET /v1/health with whatever the test sets, counting the probes."""

    def __init__(self) -> None:
        self.hits = 0
        self.status = 200
        self.body: Any = {"status": "ok"}

    async def health(self, _: web.Request) -> web.Response:
        self.hits += 1
        await asyncio.sleep(0.01)  # a real round trip, long enough for callers to overlap
        if isinstance(self.body, bytes):
            return web.Response(status=self.status, body=self.body, content_type="application/json")
        return web.json_response(self.body, status=self.status)


@pytest.fixture
async def coordinator_health() -> AsyncIterator[tuple[Coordinator, str]]:
    stand_in = Coordinator()
    app = web.Application()
    app.router.add_get("/v1/health", stand_in.health)
    runner, url = await serve_app(app)
    yield stand_in, url
    await runner.cleanup()


@pytest.fixture
async def probe_for(clock: FakeClock) -> AsyncIterator[Any]:
    made: list[CoordinatorProbe] = []

    def make(url: str | None) -> CoordinatorProbe:
        probe = CoordinatorProbe(gateway_config(url).upstream, clock)
        probe.start()
        made.append(probe)
        return probe

    yield make
    for probe in made:
        await probe.close()


async def test_a_flood_of_health_checks_costs_the_coordinator_one_probe_per_ttl(
        coordinator_health, probe_for, clock: FakeClock) -> None:
    stand_in, url = coordinator_health
    probe = probe_for(url)
    bodies = await asyncio.gather(*(probe.health() for _ in range(20)))
    assert stand_in.hits == 1
    assert bodies[0] == {"status": "ok", "time": rfc3339(clock.time()),
                         "checks": [{"name": "run_coordinator", "status": "ok"}]}
    clock.advance(PROBE_TTL_S * 0.9)
    assert (await probe.ready())[0] and stand_in.hits == 1       # still the cached answer
    stand_in.body = {"status": "down"}
    clock.advance(PROBE_TTL_S * 0.2)
    ready, check = await probe.ready()
    assert stand_in.hits == 2 and not ready and check == {"name": "run_coordinator", "status": "down"}


@pytest.mark.parametrize("status, body, expected, ready", [
    (200, {"status": "degraded"}, {"status": "degraded"}, True),
    (503, {"status": "down"}, {"status": "degraded", "message": "health answered HTTP 503"}, False),
    (200, b"{not json", {"status": "down", "message": "unreachable: "}, False),
    (200, {"status": "fine"}, {"status": "degraded", "message": "health body is not an ARP Health"}, False),
    (200, ["ok"], {"status": "degraded", "message": "health body is not an ARP Health"}, False),
])
async def test_what_the_coordinator_answers_becomes_one_arp_health_check(
        coordinator_health, probe_for, status: int, body: Any, expected: dict, ready: bool) -> None:
    stand_in, url = coordinator_health
    stand_in.status, stand_in.body = status, body
    got_ready, check = await probe_for(url).ready()
    assert got_ready is ready
    assert (check["name"], check["status"]) == ("run_coordinator", expected["status"])
    assert ("message" in check) == ("message" in expected)
    assert check.get("message", "").startswith(expected.get("message", ""))  # the prefix the cause follows


async def test_no_coordinator_or_none_listening_is_down(probe_for) -> None:
    assert await probe_for(None).ready() == (False, {"name": "run_coordinator", "status": "down",
                                                     "message": "run_coordinator_missing: no upstream.url"})
    ready, check = await probe_for(f"http://127.0.0.1:{free_port()}").ready()
    assert not ready and check["status"] == "down" and check["message"].startswith("unreachable: ")
