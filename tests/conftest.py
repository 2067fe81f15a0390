"""Shared fixtures: real sockets on 127.0.0.1, ephemeral ports, real parts behind the gateway.

Helpers and fakes live in tests/support/; this file only turns them into fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.util.clock import FakeClock
from proxy.settings.config import AuthConfig
from proxy.dev import coordinator as devcoordinator
from proxy.auth.jwks_refresh import JwksRegistry
from proxy.runtime.server import start_gateway
from tests.support.gateway import Upstream, gateway_config
from tests.support.keys import IdP, Registries, park, signer


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
    """`url = await gateway(upstream_url, auth={...})` starts a gateway; all are stopped at teardown."""
    runners: list[web.AppRunner] = []

    async def start(upstream: str | None, /, **sections: Any) -> str:
        runner, url = await start_gateway(gateway_config(upstream, **sections))
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


# --------------------------------------------------------------------------- keys (tests/support/keys.py)


@pytest.fixture
async def idp() -> AsyncIterator[IdP]:
    """The JWKS fake with tenant "a" publishing key a-rsa and tenant "b" publishing b-rsa."""
    server = IdP()
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
    return FakeClock()


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
