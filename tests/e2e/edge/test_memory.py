"""Bounded memory at the edge (issue 15): trailers, chunked bodies and the process-wide buffer budget.

Each test runs a gateway in this process over real loopback sockets, with a
coordinator that can be held (a slow coordinator keeps bodies buffered in the
gateway), and reads `arp_gateway_buffered_bytes` from the gateway's own
exposition. Client loops are bounded in count and time; timeouts are set to
about a second so the tests can watch them act. The budget tests run on both
event loops the gateway offers: they differ in when a transport starts reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

import proxy.edge

from proxy.settings.config import ConfigError, build_config
from proxy.runtime.server import GatewayServer, start_gateway
from tests.support.gateway import Upstream, gateway_config, json_response
from tests.support.rawhttp import RawConnection, Response, read_response, request

MIB = 1024 * 1024
JSON = ("Content-Type", "application/json")
CHUNKED = ("Transfer-Encoding", "chunked")


# --------------------------------------------------------------------------- helpers


class Coordinator:
    """Cancels answered once `gate` opens; event streams that end once `stream_end` is set."""

    def __init__(self) -> None:
        self.upstream = Upstream()
        self.gate = asyncio.Event()
        self.stream_end = asyncio.Event()
        self.upstream.route("POST", "/v1/runs/{run_id}:cancel", self._cancel)
        self.upstream.route("GET", "/v1/runs/{run_id}/events", self._events)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(self.gate.wait(), 30)
        return json_response(200, {"run_id": request.match_info["run_id"]})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"type": "started"}\n')
        await asyncio.wait_for(self.stream_end.wait(), 30)
        return resp

    @property
    def bodies(self) -> list[bytes]:
        return [r["body"] for r in self.upstream.requests if r["method"] == "POST"]


@contextlib.asynccontextmanager
async def edge(**sections: Any) -> AsyncIterator[tuple[Coordinator, GatewayServer, str]]:
    coordinator = Coordinator()
    upstream_url = await coordinator.upstream.start()
    sections.setdefault("upstream", {})["request_timeout_s"] = 30
    cfg = gateway_config(upstream_url, metrics={"enabled": True, "port": 0}, logging={"access_log": False},
                         **sections)
    server, url = await start_gateway(cfg)
    try:
        yield coordinator, server, url
    finally:
        coordinator.gate.set()
        coordinator.stream_end.set()
        await server.cleanup()
        await coordinator.upstream.close()


def gauge(server: GatewayServer, name: str = "arp_gateway_buffered_bytes") -> float:
    metrics = server.gateway.metrics
    assert metrics is not None
    body, _ = metrics.exposition()
    found = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", body, re.M)
    assert found is not None, f"{name} not exposed"
    return float(found[1])


def counter(server: GatewayServer, family: str, label: str) -> float:
    metrics = server.gateway.metrics
    assert metrics is not None
    body, _ = metrics.exposition()
    found = re.search(rb"^" + family.encode() + rb"_total\{" + label.encode() + rb"\} (\S+)$", body, re.M)
    assert found is not None, f"{family}{{{label}}} not exposed"
    return float(found[1])


class Peak:
    """Samples the buffered-bytes gauge every few milliseconds while a test runs; keeps the largest."""

    def __init__(self, server: GatewayServer) -> None:
        self.server = server
        self.value = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.value = max(self.value, gauge(self.server))
            await asyncio.sleep(0.005)  # samples the real buffer gauge

    async def __aenter__(self) -> Peak:
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def until(condition: Any, within: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)  # polls real sockets and gauges
    return bool(condition())


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def offer(conn: RawConnection, piece: bytes, total: int, stop: asyncio.Future[Any],
                within: float = 10.0) -> tuple[int, int]:
    """Writes `piece` until `total` bytes went out, the gateway stops taking them (a drain stalls for
    half a second), the connection breaks, `stop` is done or `within` s passed. Returns (bytes
    written, largest RSS growth of this process meanwhile)."""
    sent, base, grown = 0, rss(), 0
    deadline = time.monotonic() + within
    while sent < total and not stop.done() and time.monotonic() < deadline:
        try:
            conn.writer.write(piece)
            await asyncio.wait_for(conn.writer.drain(), 0.5)
        except (TimeoutError, ConnectionError):
            break
        sent += len(piece)
        grown = max(grown, rss() - base)
    return sent, grown


def overloaded(resp: Response | None) -> bool:
    if resp is None or resp.status != 503:
        return False
    body = resp.json()
    return body["error"]["code"] == "overloaded" and body["error"].get("retryable") is True


# --------------------------------------------------------------------------- trailers


async def test_an_endless_trailer_is_refused_with_431_and_never_buffered():
    async with edge(limits={"body_timeout_s": 60, "header_timeout_s": 60}) as (coordinator, server, url):
        async with await RawConnection.open(url) as conn:
            await conn.send(request("POST", "/v1/runs/r1:cancel", [JSON, CHUNKED]) + b"2\r\n{}\r\n0\r\nX-Trailer: ")
            answer = asyncio.ensure_future(conn.response(method="POST", timeout=10))
            sent, grown = await offer(conn, b"a" * 65536, 32 * MIB, answer)
            resp = await answer
            assert resp is not None and resp.status == 431, resp and resp.describe()
            error = resp.envelope()
            assert error is not None and error["code"] == "request_header_fields_too_large"
            assert error["details"]["reason"] == "trailer_too_large"
            assert resp.closes
        assert sent < 32 * MIB, "the gateway kept reading an endless trailer"
        assert grown < 16 * MIB, f"RSS grew {grown >> 20} MiB while the trailer was offered"
        assert coordinator.upstream.requests == []
        assert await until(lambda: gauge(server) == 0, 3)


async def test_an_endless_trailer_behind_an_open_event_stream_stops_being_read():
    """No deadline applies while the stream ahead of it is answered: the trailer limit alone must stop it."""
    async with edge(limits={"body_timeout_s": 60, "header_timeout_s": 60}) as (coordinator, server, url):
        async with await RawConnection.open(url) as conn:
            await conn.send(request("GET", "/v1/runs/r1/events"))
            await conn.send(request("POST", "/v1/runs/r1:cancel", [JSON, CHUNKED]) + b"2\r\n{}\r\n0\r\nX-Trailer: ")
            never = asyncio.get_running_loop().create_future()
            sent, grown = await offer(conn, b"a" * 65536, 32 * MIB, never)
            assert sent < 32 * MIB, "the gateway kept reading an endless trailer behind an open stream"
            assert grown < 16 * MIB, f"RSS grew {grown >> 20} MiB while the trailer was offered"
            coordinator.stream_end.set()
            stream = await conn.response(timeout=10)
            assert stream is not None and stream.status == 200, stream and stream.describe()
            resp = await conn.response(method="POST", timeout=10)
            assert resp is not None and resp.status == 431, resp and resp.describe()
            assert resp.closes
        assert coordinator.bodies == []


async def test_trailer_fields_count_against_max_headers():
    async with edge(limits={"max_headers": 10}) as (coordinator, _server, url):
        coordinator.gate.set()
        async with await RawConnection.open(url) as conn:
            trailers = b"".join(b"X-T-%d: 1\r\n" % i for i in range(8))
            await conn.send(request("POST", "/v1/runs/r1:cancel", [JSON, CHUNKED]) + b"2\r\n{}\r\n0\r\n"
                            + trailers + b"\r\n")
            resp = await conn.response(method="POST")
            assert resp is not None and resp.status == 431, resp and resp.describe()
        async with await RawConnection.open(url) as conn:  # a few trailer fields are fine, and dropped
            await conn.send(request("POST", "/v1/runs/r1:cancel", [JSON, CHUNKED]) + b"2\r\n{}\r\n0\r\nX-T: 1\r\n\r\n")
            resp = await conn.response(method="POST")
            assert resp is not None and resp.status == 200, resp and resp.describe()
        assert coordinator.bodies == [b"{}"]


# --------------------------------------------------------------------------- a body in tiny chunks


async def test_a_1_mib_body_in_2_byte_chunks_holds_about_1_mib():
    body = bytes(range(256)) * 4096
    wire = b"".join(b"2\r\n" + body[i:i + 2] + b"\r\n" for i in range(0, len(body), 2)) + b"0\r\n\r\n"
    async with edge(limits={"body_timeout_s": 30}) as (coordinator, server, url):
        async with await RawConnection.open(url) as conn:
            head = request("POST", "/v1/runs/r1:cancel", [JSON, CHUNKED])
            tracemalloc.start()
            try:
                await conn.send(head + wire)
                assert await until(lambda: len(coordinator.bodies) == 1, 20), "the body never reached the coordinator"
                # Held while the coordinator answers: what the edge's code allocated and still holds.
                snapshot = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            held = sum(stat.size for stat in snapshot.filter_traces(
                [tracemalloc.Filter(True, str(Path(proxy.edge.__file__).parent / "*"))]).statistics("filename"))
            assert held < 1.5 * MIB, f"the edge holds {held / MIB:.1f} MiB for a 1 MiB body"
            buffered = gauge(server)
            coordinator.gate.set()
            resp = await conn.response(method="POST", timeout=10)
            assert resp is not None and resp.status == 200, resp and resp.describe()
        assert coordinator.bodies == [body]
        assert len(body) <= buffered <= len(body) + len(head), buffered
        assert await until(lambda: gauge(server) == 0, 3)


# --------------------------------------------------------------------------- the budget


LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@LOOPS
def test_uploads_past_the_budget_wait_then_get_503_overloaded_and_the_rest_resumes(run, caplog):
    run(_uploads_past_the_budget())
    said = [r for r in caplog.records if r.getMessage() == "buffer budget full: refusing with 503"]
    assert len(said) == 1, "the 503s were not logged, or logged more than once in 10 s"


async def _uploads_past_the_budget() -> None:
    budget = 4 * MIB
    body = b"x" * MIB
    limits = {"max_buffered_bytes": budget, "body_timeout_s": 1, "header_timeout_s": 2}
    async with edge(limits=limits) as (coordinator, server, url):
        conns = [await RawConnection.open(url) for _ in range(16)]
        try:
            async with Peak(server) as peak:
                for conn in conns:
                    conn.writer.write(request("POST", "/v1/runs/r1:cancel", [JSON], body))
                answers = [asyncio.ensure_future(conn.response(method="POST", timeout=20)) for conn in conns]
                # The coordinator holds what it got; the rest starve for the body timeout.
                settled = await until(lambda: len(coordinator.bodies) + sum(
                    a.done() for a in answers) == len(conns), 10)
                assert settled, "uploads neither reached the coordinator nor were refused"
                coordinator.gate.set()
                resps = await asyncio.gather(*answers)
        finally:
            for conn in conns:
                await conn.close()
        statuses = [r.status if r else None for r in resps]
        ok = [r for r in resps if r is not None and r.status == 200]
        refused = [r for r in resps if overloaded(r)]
        assert len(ok) + len(refused) == len(conns), statuses
        assert refused, "nothing was refused though 16 MiB were offered to a 4 MiB budget"
        assert len(ok) == len(coordinator.bodies) >= 1, statuses
        assert all(b == body for b in coordinator.bodies)
        # Past the budget by at most the one read that filled it.
        assert peak.value <= budget + 256 * 1024, f"{peak.value / MIB:.2f} MiB buffered with a 4 MiB budget"
        # Starved bodies, and heads never read while the budget stayed full.
        assert counter(server, "arp_gateway_overloaded", 'waiting_for="body"') >= 1
        assert counter(server, "arp_gateway_overloaded", 'waiting_for="body"') + counter(
            server, "arp_gateway_overloaded", 'waiting_for="head"') == len(refused)
        assert await until(lambda: gauge(server) == 0, 3), gauge(server)
        async with await RawConnection.open(url) as conn:  # the budget has room again
            await conn.send(request("POST", "/v1/runs/r2:cancel", [JSON], body))
            resp = await conn.response(method="POST", timeout=10)
            assert resp is not None and resp.status == 200, resp and resp.describe()


@LOOPS
def test_many_unfinished_heads_stay_within_the_budget_and_starved_ones_get_503(run):
    run(_unfinished_heads())


async def _unfinished_heads() -> None:
    budget = 1 * MIB
    limits = {"max_buffered_bytes": budget, "max_body_bytes": 64 * 1024, "header_timeout_s": 1}
    async with edge(limits=limits) as (coordinator, server, url):
        coordinator.gate.set()
        conns: list[RawConnection] = []
        try:
            async with Peak(server) as peak:
                for _ in range(60):  # 60 heads of 60 KB that never end: 3.5 MiB against a 1 MiB budget
                    conn = await RawConnection.open(url)  # most connect while the budget is full
                    conns.append(conn)
                    conn.writer.write(b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 60000)
                resps = await asyncio.gather(*(read_response(c.reader, timeout=10) for c in conns),
                                             return_exceptions=True)
        finally:
            for conn in conns:
                await conn.close()
        refused = [r for r in resps if isinstance(r, Response) and overloaded(r)]
        assert refused, [r if not isinstance(r, Response) else r.status for r in resps]
        # A connection accepted while the budget is full may be read once before it is held (uvloop);
        # past the ceiling new ones are turned away.
        ceiling = server.listener.budget.ceiling
        assert peak.value <= ceiling + 256 * 1024, f"{peak.value / MIB:.2f} MiB buffered with a 1 MiB budget"
        assert counter(server, "arp_gateway_overloaded", 'waiting_for="head"') == len(refused)
        assert await until(lambda: gauge(server) == 0, 3), gauge(server)
        async with await RawConnection.open(url) as conn:
            await conn.send(request("GET", "/v1/runs/r1/events"))
            coordinator.stream_end.set()
            resp = await conn.response(timeout=10)
            assert resp is not None and resp.status == 200, resp and resp.describe()


async def test_a_body_that_arrived_while_waiting_for_its_reservation_does_not_stall_the_connection():
    """Two pipelined uploads in one write: the first one's reservation leaves no room for the second's,
    whose body came in the same read anyway. Once both are answered the connection reads on."""
    limits = {"max_buffered_bytes": 109_000, "max_body_bytes": 100_000, "max_header_bytes": 9000}
    async with edge(limits=limits) as (coordinator, server, url):
        async with await RawConnection.open(url) as conn:
            await conn.send(request("POST", "/v1/runs/a:cancel", [JSON], b"a" * 100_000)
                            + request("POST", "/v1/runs/b:cancel", [JSON], b"b" * 9000))
            assert await until(lambda: len(coordinator.bodies) == 1, 5)
            coordinator.gate.set()
            for _ in range(2):
                resp = await conn.response(method="POST")
                assert resp is not None and resp.status == 200, resp and resp.describe()
            await conn.send(request("POST", "/v1/runs/c:cancel", [JSON], b"c" * 10))
            resp = await conn.response(method="POST", timeout=5)
            assert resp is not None and resp.status == 200, resp and resp.describe()
        assert [len(b) for b in coordinator.bodies] == [100_000, 9000, 10]
        assert await until(lambda: gauge(server) == 0, 3), gauge(server)


async def test_the_gauge_returns_to_zero_after_finished_refused_vanished_and_timed_out_requests():
    body = b"y" * 200_000
    limits = {"body_timeout_s": 1, "header_timeout_s": 1, "max_body_bytes": 300_000}
    async with edge(limits=limits) as (coordinator, server, url):
        coordinator.gate.set()
        async with await RawConnection.open(url) as finished:
            await finished.send(request("POST", "/v1/runs/r1:cancel", [JSON], body) * 2)
            for _ in range(2):
                resp = await finished.response(method="POST")
                assert resp is not None and resp.status == 200, resp and resp.describe()
        async with await RawConnection.open(url) as too_large:
            await too_large.send(request("POST", "/v1/runs/r1:cancel", [JSON, CHUNKED]) + b"".join(
                b"%x\r\n%s\r\n" % (len(body), body) for _ in range(2)))
            resp = await too_large.response(method="POST")
            assert resp is not None and resp.status == 413, resp and resp.describe()
        async with await RawConnection.open(url) as stalled:
            await stalled.send(request("POST", "/v1/runs/r1:cancel", [JSON, ("Content-Length", "250000")])
                               + body)
            resp = await stalled.response(method="POST")
            assert resp is not None and resp.status == 408, resp and resp.describe()
        vanished = await RawConnection.open(url)
        await vanished.send(request("POST", "/v1/runs/r1:cancel", [JSON, ("Content-Length", "250000")]) + body)
        half_head = await RawConnection.open(url)
        await half_head.send(b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"q" * 30000)
        assert await until(lambda: gauge(server) >= len(body) + 30000, 3), gauge(server)
        await vanished.close()
        await half_head.close()
        assert await until(lambda: gauge(server) == 0, 3), gauge(server)


# --------------------------------------------------------------------------- configuration


def test_max_buffered_bytes_must_hold_one_whole_request():
    try:
        build_config({"auth": {"mode": "disabled"}, "limits": {"max_buffered_bytes": MIB, "max_body_bytes": MIB}})
    except ConfigError as exc:
        assert exc.problems == ["limits.max_buffered_bytes: must hold at least one whole request: "
                                "limits.max_body_bytes plus limits.max_header_bytes (1114112)"]
    else:
        raise AssertionError("a budget smaller than one request was accepted")
    assert build_config({"auth": {"mode": "disabled"}}).limits.max_buffered_bytes == 64 * MIB


def test_the_default_connection_cap_is_bounded_by_the_budget():
    from proxy.edge.listener import CONNECTION_BYTES, default_max_connections

    # Whatever the open-file limit (pods often allow a million), no more than the budget could serve.
    assert default_max_connections(100, 64 * MIB) <= 64 * MIB // CONNECTION_BYTES
    assert default_max_connections(100, 64 * MIB) <= default_max_connections(100)
