"""Coordinator faults the gateway must survive, each followed by a request that succeeds on the same gateway.

Covered elsewhere and not repeated here: refused connections (502, test_forwarding),
slow headers (504, test_forwarding), a chunked stream or a Content-Length body cut
short (abnormal end, test_forwarding), a silent stream (idle timeout, test_forwarding),
restarts the gateway did not see (test_pool_overload). Here: a coordinator that
accepts and never answers, one that answers garbage, a reset in the middle of an
NDJSON stream, a restart with requests in flight, and, after each, recovery with no
gateway restart. Every wait is bounded well above the configured timeouts, so a hang
fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.dev import coordinator as devcoordinator
from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START, gateway_config
from tests.support.process import free_port
from tests.support.relay import reset
from tests.support.schemas import envelope_problems

REQUEST_TIMEOUT_S = 1.0
RUN = b'{"run_id": "run_1", "state": "running", "root_node_run_id": "n1", "started_at": "2026-01-01T00:00:00Z"}'


class Scripted:
    """A coordinator on a fixed loopback port whose behaviour the test switches at will.

    `mode`: ok (a Run per request, NDJSON for events), silent (accept, read, never answer),
    garbage (not HTTP), reset_stream (two NDJSON lines, then a TCP reset), hold (wait for
    `released`, then answer ok)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.port = 0
        self.received: list[bytes] = []
        self.released = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """The process dies: the listener closes and every connection is reset."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            reset(writer)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.received.append(head.split(b"\r\n", 1)[0])
                mode = self.mode
                if mode == "silent":
                    await asyncio.sleep(3600)  # never answers: the gateway's real timeout ends it
                if mode == "garbage":
                    writer.write(b"SMTP READY\r\n\x00\x01\x02 not http at all\r\n\r\n")
                    await writer.drain()
                    continue
                if mode == "hold":
                    await self.released.wait()
                if b"/events" in head.split(b"\r\n", 1)[0]:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    for seq in range(2):
                        line = b'{"seq": %d}\n' % seq
                        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                        await writer.drain()
                        await asyncio.sleep(0.05)  # a real coordinator's pacing
                    if mode == "reset_stream":
                        reset(writer)
                        return
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(RUN), RUN))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()


@pytest.fixture
async def scripted():
    server = Scripted()
    yield server
    if server._server is not None and server._server.is_serving():
        await server.stop()


@pytest.fixture
async def through(scripted):
    servers = []

    async def start(**sections) -> str:
        url = await scripted.start()
        cfg = gateway_config(url, **{"upstream": {"request_timeout_s": REQUEST_TIMEOUT_S,
                                                  "stream_idle_timeout_s": 2, **sections.pop("upstream", {})},
                                     **sections})
        server, gateway = await start_gateway(cfg)
        servers.append(server)
        return gateway

    yield start
    for server in servers:
        await server.cleanup()


async def envelope(resp: aiohttp.ClientResponse) -> dict:
    body = await resp.read()
    assert resp.headers["Content-Type"].startswith("application/json"), body
    assert not envelope_problems(body), body
    return json.loads(body)["error"]


async def recovers(http: aiohttp.ClientSession, gateway: str) -> None:
    """The next request after the fault succeeds, on the same gateway process."""
    async with asyncio.timeout(10):
        async with http.get(gateway + "/v1/runs/run_1") as resp:
            assert resp.status == 200
            assert await resp.read() == RUN


async def test_a_coordinator_that_accepts_and_never_answers_is_504_within_the_timeout(scripted, through, http):
    gateway = await through()
    scripted.mode = "silent"
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10 * REQUEST_TIMEOUT_S):
        async with http.post(gateway + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 504
            error = await envelope(resp)
    assert error["code"] == "run_coordinator_timeout"
    assert error["retryable"] is False                   # a run start that may have begun is not "retry me"
    assert loop.time() - started >= REQUEST_TIMEOUT_S * 0.9
    assert len(scripted.received) == 1                   # and it was sent exactly once
    scripted.mode = "ok"
    await recovers(http, gateway)


async def test_a_malformed_response_is_502_bad_response_and_the_next_request_succeeds(scripted, through, http):
    gateway = await through()
    scripted.mode = "garbage"
    async with asyncio.timeout(10):
        async with http.get(gateway + "/v1/runs/run_1") as resp:
            assert resp.status == 502
            error = await envelope(resp)
    assert error["code"] == "run_coordinator_bad_response"
    scripted.mode = "ok"
    await recovers(http, gateway)


async def test_a_reset_mid_ndjson_stream_is_an_abnormal_end_for_the_client(scripted, through, http):
    gateway = await through()
    scripted.mode = "reset_stream"
    got: list[bytes] = []
    async with asyncio.timeout(10):
        async with http.get(gateway + "/v1/runs/run_1/events") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for line in resp.content:
                    got.append(line)
    assert got == [b'{"seq": 0}\n', b'{"seq": 1}\n']     # what arrived was relayed, then the break shows
    scripted.mode = "ok"
    await recovers(http, gateway)
    async with http.get(gateway + "/v1/runs/run_1/events") as resp:
        assert [line async for line in resp.content] == [b'{"seq": 0}\n', b'{"seq": 1}\n']


async def test_a_restart_with_requests_in_flight_never_reports_a_false_success(scripted, through, http):
    gateway = await through(upstream={"request_timeout_s": 5})
    scripted.mode = "hold"
    posts = [asyncio.create_task(http.post(gateway + "/v1/runs", json=RUN_START)) for _ in range(3)]
    gets = [asyncio.create_task(http.get(gateway + "/v1/runs/run_1")) for _ in range(3)]
    async with asyncio.timeout(10):
        while len(scripted.received) < 6:
            await asyncio.sleep(0.01)  # polls a real server
    # The process dies with six requests inside it and comes back on the same port.
    await scripted.stop()
    scripted.mode = "ok"
    scripted.released.set()
    await scripted.start()
    async with asyncio.timeout(15):
        post_answers = await asyncio.gather(*posts)
        get_answers = await asyncio.gather(*gets)
    for resp in post_answers:
        # A run start the coordinator may have begun must not be reported as started, nor as safe to resend.
        assert resp.status == 502
        error = await envelope(resp)
        assert (error["code"], error["retryable"]) == ("run_coordinator_unavailable", False)
    for resp in get_answers:
        # A GET is safe to repeat: the gateway retried it on the restarted coordinator.
        assert resp.status == 200
        assert await resp.read() == RUN
    await recovers(http, gateway)


async def test_a_real_coordinator_restarted_under_load_serves_the_next_requests(http):
    """The dev coordinator itself, stopped and started on the same port while the gateway keeps running."""
    port = free_port()
    runner, url = await devcoordinator.start(port=port, step_delay_s=0.01)
    server, gateway = await start_gateway(gateway_config(url))
    try:
        for _ in range(8):
            async with http.post(gateway + "/v1/runs", json=RUN_START) as resp:
                assert resp.status == 200
        await runner.cleanup()
        async with http.post(gateway + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 502                      # down: a documented answer, at once
            assert (await envelope(resp))["code"] == "run_coordinator_unavailable"
        runner, _ = await devcoordinator.start(port=port, step_delay_s=0.01)
        for _ in range(8):
            async with http.post(gateway + "/v1/runs", json=RUN_START) as resp:
                assert resp.status == 200
                run_id = (await resp.json())["run_id"]
            async with http.get(f"{gateway}/v1/runs/{run_id}") as resp:
                assert resp.status == 200
    finally:
        await server.cleanup()
        await runner.cleanup()
