"""The stage driver over real sockets: a request that waits for nothing is answered from the read
callbacks alone, one that waits continues in a single task through the same stages, and the
retry rules are one policy.

The coordinator is a loopback RawServer; the client writes raw bytes, so the head and body of
a run start arrive in one read, as a keep-alive client's usually do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

import proxy
from proxy.arp.answers import Answer
from proxy.runtime.server import start_gateway
from proxy.settings.config import RetryConfig
from proxy.upstream.pool import ConnectFailed, ConnectionReset, PoolBusy
from proxy.upstream.retry import RetryPolicy
from tests.support.gateway import RUN_START, gateway_config
from tests.support.servers import RawServer

PACKAGE = str(Path(proxy.__file__).resolve().parent)
RUN = json.dumps({"run_id": "r1", "status": "pending"}).encode()


async def started(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                 % (len(RUN), RUN))
    await writer.drain()


def run_start() -> bytes:
    body = json.dumps(RUN_START).encode()
    return (b"POST /v1/runs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return int(head.split(b" ")[1]), await asyncio.wait_for(reader.readexactly(length), 5)


class GatewayTasks:
    """Counts the tasks the gateway's own code creates (the test's client and servers are not counted)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task:
        code = getattr(coro, "cr_code", None)
        if code is not None and code.co_filename.startswith(PACKAGE):
            self.names.append(code.co_qualname)
        return asyncio.Task(coro, loop=loop, **kwargs)


@pytest.fixture
async def tasks() -> AsyncIterator[GatewayTasks]:
    loop = asyncio.get_running_loop()
    counter = GatewayTasks()
    previous = loop.get_task_factory()
    loop.set_task_factory(counter)
    try:
        yield counter
    finally:
        loop.set_task_factory(previous)


async def test_a_request_that_waits_for_nothing_is_answered_without_a_task(tasks: GatewayTasks) -> None:
    coordinator = RawServer(started)
    server, url = await start_gateway(gateway_config(await coordinator.start()))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        status, body = await exchange(reader, writer, run_start())  # opens the pooled coordinator connection
        assert status == 200 and json.loads(body)["run_id"] == "r1"
        tasks.names.clear()
        for _ in range(3):
            status, body = await exchange(reader, writer, run_start())
            assert status == 200 and json.loads(body)["run_id"] == "r1"
        assert tasks.names == [], f"the fast path created tasks: {tasks.names}"
        assert len(coordinator.requests) == 4 and coordinator.connections == 1
    finally:
        writer.close()
        await server.cleanup()
        await coordinator.close()


async def test_a_stage_that_waits_moves_the_rest_into_one_task(tasks: GatewayTasks) -> None:
    """Stages after a waiting one run in the same task, in order, and the request is answered as usual;
    the same stage answering now keeps the request task-free."""
    coordinator = RawServer(started)
    server, url = await start_gateway(gateway_config(await coordinator.start()))
    gateway = server.gateway
    ran: list[str] = []
    waiting = False

    def admitted(ex: Any) -> Any:
        ran.append("admit")
        if not waiting:
            return None

        async def later() -> Answer | None:
            await asyncio.sleep(0)
            ran.append("admit done")
            return None
        return later()

    def traced(name: str, stage: Any) -> Any:
        def run(ex: Any) -> Any:
            ran.append(name)
            return stage(ex)
        return run

    stages = list(gateway._stages)
    index = stages.index(gateway._admit)
    stages[index] = admitted
    gateway._stages = tuple(traced(getattr(s, "__name__", "stage"), s) if i > index else s
                            for i, s in enumerate(stages))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        await exchange(reader, writer, run_start())  # opens the pooled coordinator connection
        ran.clear()
        tasks.names.clear()
        waiting = True
        status, body = await exchange(reader, writer, run_start())
        assert status == 200 and json.loads(body)["run_id"] == "r1"
        assert ran == ["admit", "admit done", "_body", "_identity", "_forward"]
        assert len(tasks.names) == 1, tasks.names  # the connection runs the rest of the stages in one task
        ran.clear()
        tasks.names.clear()
        waiting = False
        status, _ = await exchange(reader, writer, run_start())
        assert status == 200 and ran == ["admit", "_body", "_identity", "_forward"] and tasks.names == []
    finally:
        writer.close()
        await server.cleanup()
        await coordinator.close()


async def test_a_body_in_a_later_read_continues_the_stages_without_a_task(tasks: GatewayTasks) -> None:
    """A client that writes the head and the body apart (http.client, aiohttp, httpx all do): the
    driver pauses at the body and the connection continues it from the read that completes it."""
    from proxy.edge.protocol import Phase

    coordinator = RawServer(started)
    server, url = await start_gateway(gateway_config(await coordinator.start()))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        await exchange(reader, writer, run_start())  # opens the pooled coordinator connection
        tasks.names.clear()
        head, _, body = run_start().partition(b"\r\n\r\n")
        for _ in range(3):
            writer.write(head + b"\r\n\r\n")
            await writer.drain()
            for _ in range(500):  # until the gateway has read the head and waits for the body
                if any(conn.phase is Phase.BODY for conn in server.listener.connections):
                    break
                await asyncio.sleep(0.002)
            else:
                pytest.fail("the gateway never waited for the body")
            status, answer = await exchange(reader, writer, body)
            assert status == 200 and json.loads(answer)["run_id"] == "r1"
        assert tasks.names == [], f"a body in a later read created tasks: {tasks.names}"
        assert len(coordinator.requests) == 4
        assert json.loads(coordinator.requests[-1].partition(b"\r\n\r\n")[2]) == RUN_START
    finally:
        writer.close()
        await server.cleanup()
        await coordinator.close()


def test_one_retry_policy_for_every_path() -> None:
    policy = RetryPolicy(RetryConfig(attempts=3))
    refused = ConnectFailed("refused", sent=False)
    reset = ConnectionReset("reset")
    # A request that never left may go again whatever its method; one that may have left, only a GET.
    assert policy.after_error("POST", refused, 1) and policy.after_error("GET", refused, 2)
    assert not policy.after_error("POST", reset, 1) and policy.after_error("GET", reset, 1)
    # Never past the attempts, never a shed request or a timeout.
    assert not policy.after_error("GET", reset, 3)
    assert not policy.after_error("GET", PoolBusy("busy"), 1) and not policy.after_error("GET", TimeoutError(), 1)
    assert policy.after_status("GET", 503, 1) and not policy.after_status("POST", 503, 1)
    assert not policy.after_status("GET", 500, 1) and not policy.after_status("GET", 502, 3)
    assert all(0 <= policy.pause(retry) <= RetryConfig().backoff_max_s for retry in range(1, 10))


async def test_a_client_that_leaves_mid_exchange_is_observed_once() -> None:
    """The client closes while the coordinator holds its request on a pooled connection (the exchange
    on callbacks): one 499, and requests_in_flight back to zero, not below."""
    held = asyncio.Event()
    answered = 0

    async def first_then_hold(writer: asyncio.StreamWriter) -> bool | None:
        nonlocal answered
        if answered == 0:
            answered += 1
            await started(writer)
            return None
        held.set()
        await asyncio.sleep(5)  # until the test ends and closes the server
        return False

    coordinator = RawServer(first_then_hold)
    server, url = await start_gateway(gateway_config(await coordinator.start(),
                                                     metrics={"enabled": True, "port": 0}))
    metrics = server.gateway.metrics
    assert metrics is not None
    get = b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        status, _ = await exchange(reader, writer, get)  # opens the pooled coordinator connection
        assert status == 200
        writer.write(get)
        await asyncio.wait_for(held.wait(), 5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with linger 0, a reset: the client is gone at once
        for _ in range(100):  # bounded: the gateway sees the close within a few loop turns
            if metrics.in_flight <= 0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        counts = {status: n[0] for (route, method, status), n in metrics._requests.items() if method == "GET"}
        assert counts == {200: 1, 499: 1} and metrics.in_flight == 0
    finally:
        await server.cleanup()
        await coordinator.close()


async def test_a_local_run_start_limit_stays_inline_and_a_redis_one_waits_in_a_task_only_for_run_starts(
        tasks: GatewayTasks, redis_server) -> None:
    coordinator = RawServer(started)
    upstream = await coordinator.start()
    rate = {"per_second": 1000, "burst": 1000}
    local, local_url = await start_gateway(gateway_config(upstream, limits={"run_start_rate": rate}))
    shared, shared_url = await start_gateway(gateway_config(
        upstream, limits={"run_start_rate": {**rate, "backend": "redis"}}, redis={"url": redis_server.url}))
    connections = []
    try:
        for url in (local_url, shared_url):
            connections.append(await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1])))
            await exchange(*connections[-1], run_start())  # opens the pooled coordinator connection
        tasks.names.clear()
        for _ in range(3):
            assert (await exchange(*connections[0], run_start()))[0] == 200
        assert tasks.names == [], f"backend: local created tasks: {tasks.names}"
        get = b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n\r\n"
        assert (await exchange(*connections[1], get))[0] == 200
        assert tasks.names == [], f"a GET with backend: redis created tasks: {tasks.names}"
        for _ in range(3):
            assert (await exchange(*connections[1], run_start()))[0] == 200
        assert len(tasks.names) == 3, tasks.names  # one task per run start, waiting for Redis
    finally:
        for _, writer in connections:
            writer.close()
        await local.cleanup()
        await shared.cleanup()
        await coordinator.close()


# --------------------------------------------------------------------------- runs and the audit trail (issue 18)


def _stage_names(tmp_path: Path, **sections: Any) -> list[str]:
    from proxy.gateway.pipeline import Gateway
    from proxy.util.clock import SystemClock

    class Probe:
        def start(self) -> None: ...
        async def close(self) -> None: ...
        async def health(self) -> dict[str, Any]: return {}
        async def ready(self) -> tuple[bool, dict[str, Any]]: return True, {}

    gateway = Gateway(gateway_config("http://127.0.0.1:9", **sections), SystemClock(), Probe(), {})
    return [getattr(stage, "__name__", "?") for stage in gateway._stages]


def test_runs_stages_are_in_the_pipeline_only_when_configured(tmp_path: Path) -> None:
    plain = ["_route", "_authenticate", "_local", "_admit", "_body", "_identity", "_forward"]
    assert _stage_names(tmp_path) == plain    # access any, no binding, no policy, no trail: nothing per request
    assert _stage_names(tmp_path, runs={"bind_identity": True}) == \
        ["_route", "_authenticate", "_local", "_admit", "_body", "bind", "_identity", "_forward"]
    assert _stage_names(tmp_path, runs={"access": "owner"}) == plain[:-1] + ["_authorize", "_forward"]
    policy = Path(__file__).resolve().parents[3] / "config" / "policies" / "owners-only.json"
    assert "_authorize" in _stage_names(tmp_path, authorization={"policy_file": str(policy)})
    audit = {"sink": "file", "path": str(tmp_path / "audit.log")}
    assert _stage_names(tmp_path, audit=audit) == plain[:-1] + ["_authorize", "_forward"]   # learns run ids
    assert _stage_names(tmp_path, audit={**audit, "on_full": "refuse"}) == \
        ["_route", "_authenticate", "_local", "_admit", "gate", "_body", "_identity", "_authorize", "_forward"]
