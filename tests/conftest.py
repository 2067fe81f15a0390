"""Shared fixtures: real sockets on 127.0.0.1, ephemeral ports, real parts behind the gateway.

Helpers and fakes live in tests/support/; this file only turns them into fixtures.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.util.clock import Clock, FakeClock
from proxy.settings.config import AuthConfig
from proxy.dev import coordinator as devcoordinator
from proxy.dev import issuer as devissuer
from proxy.auth.jwks_refresh import JwksRegistry
from proxy.runtime.server import start_gateway
from tests.support.gateway import Upstream, gateway_config, json_response
from tests.support.idp import MockIdp
from tests.support.keys import JwksServer, Registries, park, signer
from tests.support.redis import RedisServer, have_redis
from tests.support.threadidp import ThreadIdp


@pytest.fixture
async def coordinator() -> AsyncIterator[str]:
    runner, url = await devcoordinator.start(step_delay_s=0.05)
    yield url
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


GatewayFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayFactory]:
    """`url = await gateway(upstream_url, auth={...})` starts a gateway; all are stopped at teardown.

    `clock=` (e.g. the `clock` fixture) replaces the system clock, for tests of expiry and cooldowns."""
    runners: list[web.AppRunner] = []

    async def start(upstream: str | None, /, *, clock: Clock | None = None, **sections: Any) -> str:
        runner, url = await start_gateway(gateway_config(upstream, **sections), clock=clock)
        runners.append(runner)
        return url

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    yield server
    await server.close()


@pytest.fixture
async def recorder(upstream: Upstream) -> Upstream:
    """The upstream, started, with one catch-all route that answers 200 and records the request."""

    async def ok(request: web.Request) -> web.Response:
        return json_response(200, {"upstream": "reached", "path": request.raw_path})

    upstream.route("*", "/{tail:.*}", ok)
    await upstream.start()
    return upstream


@pytest.fixture
async def issuer() -> AsyncIterator[devissuer.DevIssuer]:
    """The dev token issuer (proxy/dev/issuer.py) on loopback: in-process, mints with `issuer.mint(...)`.
    Not the IdP: for tokens from a real OIDC provider use `idp`."""
    runner, dev = await devissuer.start(port=0)
    yield dev
    await runner.cleanup()


# --------------------------------------------------------------------------- the IdP (tests/support/idp.py)


@pytest.fixture(scope="session")
def idp() -> Iterator[ThreadIdp]:
    """The IdP: oauth2-mock-server on loopback, one node process for the whole run, minting tokens.

    Shared, so it cannot be changed: tests that rotate its keys or take it down use `fresh_idp`."""
    shared = ThreadIdp()
    yield shared
    shared.close()


@pytest.fixture
async def fresh_idp() -> AsyncIterator[MockIdp]:
    """An oauth2-mock-server of this test alone, in the test's loop: for key rotation and outages."""
    own = await MockIdp.start()
    yield own
    await own.close()


# --------------------------------------------------------------------------- keys (tests/support/keys.py)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    """The scripted JWKS server: tenant "a" publishes key a-rsa and tenant "b" publishes b-rsa."""
    server = JwksServer()
    await server.start()
    server.publish("a", signer("a-rsa"))
    server.publish("b", signer("b-rsa"))
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    """Time that moves only on `clock.advance(s)`. It starts at the real time, in whole seconds as
    JWT dates are, so tokens the IdP mints with real iat/exp are valid on it too."""
    return FakeClock(start=float(int(time.time())))


@pytest.fixture
async def registries(session: aiohttp.ClientSession, clock: FakeClock) -> AsyncIterator[Registries]:
    """Builds and starts registries (background loops parked); closes them all at the end of the test."""
    made: list[JwksRegistry] = []

    async def make(auth: AuthConfig, **kwargs: Any) -> JwksRegistry:
        kwargs.setdefault("sleep", park)
        registry = JwksRegistry(auth, clock, **kwargs)
        made.append(registry)
        await registry.start(session)
        return registry

    yield make
    for registry in made:
        await registry.close()


# --------------------------------------------------------------------------- Redis (tests/support/redis.py)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A real redis-server of this test alone: free loopback port, temporary directory, no persistence."""
    if not have_redis():
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with RedisServer(tmp_path) as server:
        yield server
