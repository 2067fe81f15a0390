"""IdP faults through the gateway: 500, invalid JSON, an empty key set, slower than the fetch timeout, down.

Each fault starts after the gateway had good keys. Within `jwks_max_stale_s` the
last good keys keep verifying; past it, tokens get 503 auth_unavailable with
Retry-After (never 401: not the client's fault) and readiness turns false; once
the IdP is healthy again the gateway recovers by itself, and the failed and
successful fetches are counted in metrics. Covered elsewhere and not repeated:
the IdP down at start-up and key rotation (test_auth_gateway), backoff and
cooldown timing (test_jwks).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest
from aiohttp import web

from proxy.dev import issuer as devissuer
from tests.support.schemas import envelope_problems
from tests.support.servers import serve_app

MAX_STALE_S = 1.5
FETCH_TIMEOUT_S = 0.3


class FlakyIdp:
    """The dev issuer's key behind a JWKS endpoint whose behaviour the test switches."""

    def __init__(self) -> None:
        self.issuer = devissuer.DevIssuer()
        self.mode = "ok"
        self.fetches = 0
        self.runner: web.AppRunner | None = None

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        mode = self.mode
        if mode == "500":
            return web.Response(status=500, text="internal error")
        if mode == "badjson":
            return web.Response(body=b'{"keys": [', content_type="application/json")
        if mode == "empty":
            return web.json_response({"keys": []})
        if mode == "slow":
            await asyncio.sleep(FETCH_TIMEOUT_S * 10)  # outlasts the gateway's real fetch timeout
        # Short max-age so refreshes happen during the test.
        return web.json_response(self.issuer.jwks(), headers={"Cache-Control": "max-age=0"})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/jwks", self.jwks)
        self.runner, url = await serve_app(app)
        self.issuer.url = url
        return url

    def token(self) -> str:
        # A new jti each time: a verified-token cache hit would prove nothing about the keys.
        return self.issuer.mint(sub="alice", extra={"jti": uuid.uuid4().hex})

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def flaky_idp():
    server = FlakyIdp()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def guarded(flaky_idp, gateway, upstream, clock):
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"reached": True})

    upstream.route("*", "/{tail:.*}", ok)
    return await gateway(await upstream.start(), clock=clock, metrics={"enabled": True, "port": 0}, auth={
        "mode": "required",
        "issuers": [{"issuer": flaky_idp.issuer.url, "audiences": ["arp-run-gateway"], "jwks_uri": flaky_idp.issuer.url + "/jwks"}],
        "jwks_cache_ttl_s": 0.2, "jwks_min_ttl_s": 0.1, "jwks_refetch_cooldown_s": 0,
        "jwks_max_stale_s": MAX_STALE_S, "jwks_fetch_timeout_s": FETCH_TIMEOUT_S})


async def call(http, url: str, flaky_idp: FlakyIdp) -> tuple[int, dict, bytes]:
    async with asyncio.timeout(10):  # a slow IdP must never make a request hang
        async with http.get(url + "/v1/runs/run_1", headers={"Authorization": f"Bearer {flaky_idp.token()}"}) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def fetches(http, url: str, result: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf'^arp_gateway_jwks_fetches_total{{issuer="[^"]+",result="{result}"}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


async def readiness(http, url: str) -> int:
    async with http.get(url + "/readyz") as resp:
        return resp.status


@pytest.mark.parametrize("fault", ["500", "badjson", "empty", "slow", "down"])
async def test_idp_fault_after_start_serves_stale_keys_then_503_then_recovers_by_itself(
        flaky_idp, guarded, upstream, http, clock, fault):
    assert (await call(http, guarded, flaky_idp))[0] == 200
    ok_before = await fetches(http, guarded, "success")

    if fault == "down":
        await flaky_idp.runner.cleanup()       # connection refused from now on, same port kept below
        port = int(flaky_idp.issuer.url.rsplit(":", 1)[1])
    else:
        flaky_idp.mode = fault

    # Within jwks_max_stale_s the last good keys still verify new tokens, though refreshes now fail.
    clock.advance(MAX_STALE_S * 0.5)
    async with asyncio.timeout(15):
        while await fetches(http, guarded, "failure") < 1:
            await asyncio.sleep(0.05)  # the refresh loop's fetch is real I/O (and a real fetch timeout)
    status, _, body = await call(http, guarded, flaky_idp)
    assert status == 200, body

    # Past it: 503 auth_unavailable, retryable, with Retry-After; never forwarded, never a 401.
    clock.advance(MAX_STALE_S * 1.5)
    forwarded = len(upstream.requests)
    status, headers, body = await call(http, guarded, flaky_idp)
    assert status == 503, body
    assert not envelope_problems(body)
    error = json.loads(body)["error"]
    assert (error["code"], error["retryable"]) == ("auth_unavailable", True)
    assert int(headers["Retry-After"]) >= 1
    assert len(upstream.requests) == forwarded      # the refused request never reached the coordinator
    assert await readiness(http, guarded) == 503
    assert await fetches(http, guarded, "failure") >= 1

    # The IdP heals: the gateway recovers by itself, no restart.
    if fault == "down":
        app = web.Application()
        app.router.add_get("/jwks", flaky_idp.jwks)
        flaky_idp.runner, _ = await serve_app(app, port)
    flaky_idp.mode = "ok"
    async with asyncio.timeout(20):
        while (await call(http, guarded, flaky_idp))[0] != 200:
            await asyncio.sleep(0.1)  # the refresh loop's backoff is a real sleep
    assert await readiness(http, guarded) == 200
    assert await fetches(http, guarded, "success") > ok_before
