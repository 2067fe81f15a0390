"""Overload answers through the gateway: 429 rate_limited on run starts, 503 run_coordinator_busy when the
coordinator pool stays full, both never forwarded and both counted; and stream figures that miss nothing."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from aiohttp import web

from tests.support.gateway import RUN_START, json_response
from tests.support.schemas import envelope_problems


def metric(exposition: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", exposition, re.M)
    assert match, f"{name}{labels} not exposed"
    return float(match.group(1))


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        return await resp.text()


def run_answer() -> web.Response:
    return json_response(200, {"run_id": "run_1", "state": "queued", "root_node_run_id": "node_1",
                               "started_at": "2026-01-01T00:00:00Z"})


@pytest.fixture
async def limited(gateway, upstream, issuer):
    async def any_route(request: web.Request) -> web.StreamResponse:
        return run_answer()

    upstream.route("*", "/{tail:.*}", any_route)
    url = await gateway(await upstream.start(),
                        auth={"mode": "optional", "issuers": [{"issuer": issuer.url, "audiences": ["arp-run-gateway"]}]},
                        limits={"run_start_rate": {"per_second": 0.01, "burst": 2}},
                        metrics={"enabled": True, "port": 0})
    return url


async def start(http, url: str, token: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(url + "/v1/runs", json=RUN_START, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_run_starts_over_the_rate_get_429_with_retry_after_and_are_not_forwarded(limited, upstream, issuer,
                                                                                        http):
    alice = issuer.mint(sub="alice")
    assert [(await start(http, limited, alice))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await start(http, limited, alice)
    assert status == 429
    assert not envelope_problems(body)
    error = json.loads(body)["error"]
    assert (error["code"], error["retryable"]) == ("rate_limited", True)
    assert int(headers["Retry-After"]) >= 1        # 0.01/s: the next token is 100 s away
    assert len([r for r in upstream.requests if r["method"] == "POST"]) == 2   # the third never left

    # Another subject has its own bucket.
    assert (await start(http, limited, issuer.mint(sub="bob")))[0] == 200
    # GET, cancel and events of the limited subject are not limited.
    auth = {"Authorization": f"Bearer {alice}"}
    for method, path in (("GET", "/v1/runs/run_1"), ("POST", "/v1/runs/run_1:cancel"),
                         ("GET", "/v1/runs/run_1/events")):
        async with http.request(method, limited + path, headers=auth) as resp:
            assert resp.status == 200, (method, path)
    exposition = await scrape(http, limited)
    assert metric(exposition, "arp_gateway_rate_limited_total", '{route="/v1/runs"}') == 1


async def test_anonymous_run_starts_are_limited_per_client_address(limited, http):
    assert [(await start(http, limited))[0] for _ in range(3)] == [200, 200, 429]
    # A token principal is not in the anonymous address's bucket.
    exposition = await scrape(http, limited)
    assert metric(exposition, "arp_gateway_rate_limited_total", '{route="/v1/runs"}') == 1


async def test_without_the_key_nothing_is_rate_limited(gateway, upstream, http):
    upstream.route("*", "/{tail:.*}", lambda request: asyncio.sleep(0, run_answer()))  # sleep(0, x): x as an awaitable, no wait
    url = await gateway(await upstream.start())
    statuses = {(await start(http, url))[0] for _ in range(20)}
    assert statuses == {200}


# --------------------------------------------------------------------------- pool exhausted


async def test_a_full_pool_sheds_with_503_run_coordinator_busy_after_queue_timeout(gateway, upstream, http):
    release = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"seq": 0}\n')
        await release.wait()
        return response

    upstream.route("GET", "/v1/runs/{run_id}/events", events)
    upstream.route("GET", "/v1/runs/{run_id}", lambda request: asyncio.sleep(0, run_answer()))  # no wait: x as an awaitable
    url = await gateway(await upstream.start(), upstream={"max_connections": 1, "queue_timeout_s": 0.3},
                        metrics={"enabled": True, "port": 0})
    # An open event stream holds the only coordinator connection.
    stream = await http.get(url + "/v1/runs/run_1/events")
    assert await stream.content.readline() == b'{"seq": 0}\n'
    try:
        async with asyncio.timeout(10):  # generous: it must end by itself, long before request_timeout_s
            async with http.get(url + "/v1/runs/run_1") as resp:
                status, headers, body = resp.status, resp.headers, await resp.read()
        assert status == 503, body
        assert not envelope_problems(body)
        error = json.loads(body)["error"]
        assert (error["code"], error["retryable"]) == ("run_coordinator_busy", True)
        assert headers["Retry-After"] == "1"
        assert len([r for r in upstream.requests if r["path"] == "/v1/runs/run_1"]) == 0
        exposition = await scrape(http, url)
        assert metric(exposition, "arp_gateway_upstream_queued_total") == 1
        assert metric(exposition, "arp_gateway_upstream_shed_total") == 1
    finally:
        release.set()
        stream.close()
    # Once the stream ends, the connection serves again.
    async with asyncio.timeout(10):
        while True:
            async with http.get(url + "/v1/runs/run_1") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)  # the gateway frees the connection once the real stream ends


# --------------------------------------------------------------------------- stream figures


async def test_a_finished_runs_events_arriving_whole_are_counted(gateway, upstream, http):
    """The common case: the run is over, so its whole NDJSON body arrives with the headers."""
    lines = b"".join(b'{"seq": %d}\n' % i for i in range(5))

    async def events(request: web.Request) -> web.Response:
        return web.Response(body=lines, headers={"Content-Type": "application/x-ndjson"})

    upstream.route("GET", "/v1/runs/{run_id}/events", events)
    url = await gateway(await upstream.start(), metrics={"enabled": True, "port": 0})
    async with http.get(url + "/v1/runs/done/events") as resp:
        assert await resp.read() == lines
    exposition = await scrape(http, url)
    assert metric(exposition, "arp_gateway_stream_lines_total") == 5
    assert metric(exposition, "arp_gateway_stream_bytes_total") == len(lines)
    assert metric(exposition, "arp_gateway_streams_open") == 0
