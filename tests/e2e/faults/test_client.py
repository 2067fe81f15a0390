"""Clients that vanish mid-upload or mid-stream: the upstream exchange is cancelled, and open connections,
file descriptors and asyncio tasks return to their baseline, measured in this process (gateway and
coordinator both live in it, so every socket either side leaks shows in /proc/self/fd)."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import web

from proxy.runtime.server import start_gateway
from tests.support.gateway import gateway_config
from tests.support.relay import reset

STREAMS = 25


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def tasks() -> int:
    return len(asyncio.all_tasks())


class Coordinator:
    """Streams NDJSON forever and holds GETs; counts the exchanges the gateway cancelled."""

    def __init__(self) -> None:
        self.open_streams = 0
        self.cancelled = 0
        self.requests = 0

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        self.open_streams += 1
        try:
            for seq in range(10_000):  # bounded: 100 s at most
                await response.write(b'{"seq": %d}\n' % seq)
                await asyncio.sleep(0.01)  # a real coordinator's pacing
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled += 1
            raise
        finally:
            self.open_streams -= 1
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self.requests += 1
        try:
            await asyncio.sleep(30)  # never answers; cancelled when the gateway drops the request
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return web.json_response({})

    async def start_run(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        return web.json_response({"run_id": "r", "state": "queued", "root_node_run_id": "n",
                                  "started_at": "2026-01-01T00:00:00Z"})


@pytest.fixture
async def stack(upstream):
    coordinator = Coordinator()
    upstream.app.router.add_get("/v1/runs/{run_id}/events", coordinator.events)
    upstream.app.router.add_get("/v1/runs/{run_id}", coordinator.slow)
    upstream.app.router.add_post("/v1/runs", coordinator.start_run)
    url = await upstream.start()
    server, gateway = await start_gateway(gateway_config(url, upstream={"request_timeout_s": 60},
                                                         metrics={"enabled": True, "port": 0},
                                                         # all the clients are one anonymous address
                                                         limits={"max_streams_per_principal": 100}))
    host, port = gateway.removeprefix("http://").split(":")
    yield coordinator, server, (host, int(port))
    await server.cleanup()


async def raw(address, request: bytes):
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def settle(check, timeout: float = 10.0) -> None:
    """Waits until `check()` holds; the gateway and coordinator clean up asynchronously."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)  # polls real sockets and tasks


async def baseline(address) -> tuple[int, int]:
    # One complete exchange first, so the pool's first connection is part of the baseline.
    body = b'{"root_node_type_ref":{"node_type_id":"a","version":"1"},"input":{}}'
    reader, writer = await raw(address, b"POST /v1/runs HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)  # the gateway has seen the real close
    return open_fds(), tasks()


async def test_clients_vanishing_mid_stream_cancel_the_upstream_and_leave_nothing_behind(stack):
    coordinator, server, address = stack
    fds, running = await baseline(address)
    clients = []
    for i in range(STREAMS):
        reader, writer = await raw(address, b"GET /v1/runs/r%d/events HTTP/1.1\r\nHost: g\r\n\r\n" % i)
        clients.append((reader, writer))
    for reader, _ in clients:
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b"\n")  # at least one event is flowing
    await settle(lambda: coordinator.open_streams == STREAMS)
    assert open_fds() >= fds + 2 * STREAMS           # the measurement can see a leak of this size
    for i, (_, writer) in enumerate(clients):
        # Half hang up cleanly, half vanish with a reset, as crashed clients and dropped networks do.
        writer.close() if i % 2 else reset(writer)
    await settle(lambda: coordinator.open_streams == 0)
    assert coordinator.cancelled == STREAMS           # every upstream exchange was cancelled
    await settle(lambda: open_fds() <= fds and tasks() <= running)
    gateway = server.gateway
    assert gateway.metrics.streams_open == 0
    assert gateway.upstream.pool.size <= 1


async def test_clients_vanishing_mid_upload_are_never_forwarded_and_leave_nothing_behind(stack):
    coordinator, server, address = stack
    fds, running = await baseline(address)
    before = coordinator.requests
    clients = []
    for _ in range(STREAMS):
        head = (b"POST /v1/runs HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        clients.append(await raw(address, head + b'{"input": {"pad": "' + b"x" * 5000))
    await asyncio.sleep(0.2)                          # the gateway is now waiting for the rest of each body
    for i, (_, writer) in enumerate(clients):
        writer.close() if i % 2 else reset(writer)
    await settle(lambda: open_fds() <= fds and tasks() <= running)
    assert coordinator.requests == before             # a half-sent run start never reached the coordinator


async def test_a_client_leaving_before_the_answer_cancels_the_upstream_request(stack):
    coordinator, _, address = stack
    fds, running = await baseline(address)
    clients = [await raw(address, b"GET /v1/runs/slow-%d HTTP/1.1\r\nHost: g\r\n\r\n" % i) for i in range(10)]
    await settle(lambda: coordinator.requests >= 11)
    for _, writer in clients:
        reset(writer)
    await settle(lambda: coordinator.cancelled == 10)
    await settle(lambda: open_fds() <= fds and tasks() <= running)
