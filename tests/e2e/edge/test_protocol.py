"""The listener as an HTTP/1.1 server, in the manner of uvicorn's tests for its httptools protocol.

Keep-alive, HTTP/1.0, pipelining order, `Connection: close`, chunked request
bodies, `Expect: 100-continue` around refusals, and flow control both ways:
a client that stops reading must stop the gateway reading from the
coordinator, and a coordinator that stalls must not stall other clients.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.support.gateway import RUN_START
from tests.support.rawhttp import RawConnection, chunked, request
from tests.support.recording import strict_upstream  # noqa: F401  (fixture)

RUN_START_BODY = json.dumps(RUN_START).encode()
JSON = ("Content-Type", "application/json")
UNREACHABLE_AUTH = {"mode": "required", "issuers": [{"issuer": "http://127.0.0.1:9/idp", "audiences": ["a"],
                                                     "jwks_uri": "http://127.0.0.1:9/jwks"}]}


async def test_keep_alive_serves_several_requests_on_one_connection(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    async with await RawConnection.open(url) as conn:
        for i in range(4):
            await conn.send(request("GET", f"/v1/runs/r{i}", [("X-Request-ID", f"ka-{i}")]))
            resp = await conn.response()
            assert resp is not None and resp.status == 200 and not resp.closes, resp and resp.describe()
            assert resp.request_id == f"ka-{i}"
    assert [r.target for r in strict_upstream.requests] == [f"/v1/runs/r{i}".encode() for i in range(4)]


async def test_http10_closes_after_the_answer(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/r1", version="1.0"))
        resp = await conn.response()
        assert resp is not None and resp.status == 200 and resp.version == "1.0"
        assert await conn.closed_by_peer()


async def test_http10_keep_alive_keeps_the_connection(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    async with await RawConnection.open(url) as conn:
        for i in range(2):
            await conn.send(request("GET", f"/v1/runs/r{i}", [("Connection", "keep-alive")], version="1.0"))
            resp = await conn.response()
            assert resp is not None and resp.status == 200 and not resp.closes, resp and resp.describe()
        assert len(strict_upstream.requests) == 2


async def test_connection_close_is_honoured(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/r1", [("Connection", "close")]))
        resp = await conn.response()
        assert resp is not None and resp.status == 200 and resp.closes
        assert await conn.closed_by_peer()


async def test_pipelined_requests_are_answered_in_order(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    pipeline = [
        request("POST", "/v1/runs", [JSON, ("X-Request-ID", "p-0")], RUN_START_BODY),
        request("GET", "/v1/runs/r1", [("X-Request-ID", "p-1")]),
        request("POST", "/v1/runs/r1:cancel", [JSON, ("X-Request-ID", "p-2"), ("Transfer-Encoding", "chunked")],
                chunked(b'{"reason": "pipelined"}', [3, 5])),
        request("GET", "/v1/node-runs/x", [("X-Request-ID", "p-3")]),  # refused locally, in its turn
        request("GET", "/v1/runs/r2/events", [("X-Request-ID", "p-4")]),
    ]
    async with await RawConnection.open(url) as conn:
        await conn.send(b"".join(pipeline))
        answers = []
        for _ in pipeline:
            resp = await conn.response()
            assert resp is not None, f"closed after {answers}"
            answers.append((resp.request_id, resp.status))
    assert answers == [("p-0", 200), ("p-1", 200), ("p-2", 200), ("p-3", 404), ("p-4", 200)]
    assert [r.one("X-Request-ID") for r in strict_upstream.requests] == [b"p-0", b"p-1", b"p-2", b"p-4"]
    assert strict_upstream.requests[2].body == b'{"reason": "pipelined"}'


async def test_a_pipelined_request_after_a_slow_one_waits_its_turn(gateway):
    """The second answer is ready first; it must still come second."""
    release = asyncio.Event()

    # A coordinator that reads requests as they come and answers /slow only when released.
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ")[1]

                async def answer(target: bytes = target) -> None:
                    if target.endswith(b"slow"):
                        await release.wait()
                    body = b'{"t": "%s"}' % target
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                asyncio.get_running_loop().create_task(answer())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = await gateway(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with await RawConnection.open(url) as conn:
            await conn.send(request("GET", "/v1/runs/slow") + request("GET", "/v1/runs/fast"))
            await asyncio.sleep(0.3)  # both requests reached the real coordinator before the slow one is released
            release.set()
            first, second = await conn.response(), await conn.response()
            assert first is not None and second is not None
            assert (first.json(), second.json()) == ({"t": "/v1/runs/slow"}, {"t": "/v1/runs/fast"})
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_chunked_body_with_extensions_and_trailers(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    wire = chunked(RUN_START_BODY, [10, 1, 50], ext=b";ext=1;quoted=\"a b\"",
                   trailers=[(b"X-Checksum", b"abc"), (b"X-Auth-Subject", b"trailer-admin")])
    async with await RawConnection.open(url) as conn:
        await conn.send(request("POST", "/v1/runs", [JSON, ("Transfer-Encoding", "chunked")], wire))
        resp = await conn.response()
        assert resp is not None and resp.status == 200, resp and resp.describe()
    (rec,) = strict_upstream.requests
    assert rec.body == RUN_START_BODY and rec.one("Content-Length") == b"%d" % len(RUN_START_BODY)
    assert rec.all("X-Checksum") == [] and rec.all("Transfer-Encoding") == []
    assert rec.one("X-Auth-Subject") != b"trailer-admin"


# --------------------------------------------------------------------------- Expect: 100-continue


async def _expect(url: str, target: str, length: int, extra: list[tuple[str, str]] = ()) -> RawConnection:
    conn = await RawConnection.open(url)
    head = request("POST", target, [JSON, ("Content-Length", str(length)), ("Expect", "100-continue"), *extra])
    await conn.send(head)
    return conn


@pytest.mark.parametrize("target", ["/v1/runs", "/v1/runs/r1:cancel"])
async def test_refused_without_a_token_gets_401_and_no_continue(gateway, strict_upstream, target):
    url = await gateway(strict_upstream.url, auth=UNREACHABLE_AUTH)
    async with await _expect(url, target, len(RUN_START_BODY)) as conn:
        resp = await conn.response(method="POST")
        assert resp is not None and resp.status == 401 and resp.interim == [], resp and resp.describe()
    assert strict_upstream.requests == []


@pytest.mark.parametrize("target", ["/v1/runs", "/v1/runs/r1:cancel"])
async def test_too_large_gets_413_and_no_continue(gateway, strict_upstream, target):
    url = await gateway(strict_upstream.url, limits={"max_body_bytes": 100})
    async with await _expect(url, target, 101) as conn:
        resp = await conn.response(method="POST")
        assert resp is not None and resp.status == 413 and resp.interim == [], resp and resp.describe()
    assert strict_upstream.requests == []


@pytest.mark.parametrize("target,body", [("/v1/runs", RUN_START_BODY), ("/v1/runs/r1:cancel", b'{"why": 1}')])
async def test_accepted_gets_continue_then_its_answer(gateway, strict_upstream, target, body):
    url = await gateway(strict_upstream.url)
    async with await _expect(url, target, len(body)) as conn:
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(body)
        resp = await conn.response(method="POST")
        assert resp is not None and resp.status == 200, resp and resp.describe()
    assert [r.body for r in strict_upstream.requests] == [body]


# --------------------------------------------------------------------------- flow control

STREAM_CHUNK = b'{"event": "tick", "pad": "' + b"x" * 16_000 + b'"}\n'


async def test_a_client_that_stops_reading_stops_the_gateway_reading_the_coordinator(gateway):
    """The coordinator's writes must block: the gateway may not buffer an unread stream without bound."""
    wanted = 64 * 1024 * 1024
    sent = 0
    blocked = asyncio.Event()
    finished = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
            while sent < wanted:
                writer.write(b"%x\r\n%s\r\n" % (len(STREAM_CHUNK), STREAM_CHUNK))
                sent += len(STREAM_CHUNK)
                try:
                    await asyncio.wait_for(writer.drain(), 1.5)
                except TimeoutError:
                    blocked.set()
                    await writer.drain()  # resumes once the client reads again
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            finished.set()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = await gateway(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        conn = await RawConnection.open(url, limit=64 * 1024)
        async with conn:
            await conn.send(request("GET", "/v1/runs/r1/events"))
            head = await conn.reader.readuntil(b"\r\n\r\n")
            assert b"transfer-encoding: chunked" in head.lower(), head
            # Stop reading. Socket buffers on both hops hold a few MiB at most.
            async with asyncio.timeout(30):
                await blocked.wait()
            held = sent
            assert held < 32 * 1024 * 1024, f"the coordinator sent {held} bytes to a client that reads nothing"
            # Reading again drains everything, intact and in order.
            received = bytearray()
            async with asyncio.timeout(60):
                while size := int((await conn.reader.readuntil(b"\r\n"))[:-2], 16):
                    received += await conn.reader.readexactly(size)
                    assert await conn.reader.readexactly(2) == b"\r\n"
            assert received == STREAM_CHUNK * (sent // len(STREAM_CHUNK)) and sent >= wanted
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stalled_coordinator_does_not_stall_other_clients(gateway):
    stall = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/stalled" in head.split(b"\r\n")[0]:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    await stall.wait()  # then nothing, ever
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = await gateway(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        stalled = await RawConnection.open(url)
        await stalled.send(request("GET", "/v1/runs/stalled/events"))
        await stalled.reader.readuntil(b"\r\n\r\n")
        for i in range(20):
            async with await RawConnection.open(url) as conn:
                await conn.send(request("GET", f"/v1/runs/r{i}"))
                resp = await conn.response(timeout=5)
                assert resp is not None and resp.status == 200 and resp.body == b"{}"
        await stalled.close()
    finally:
        stall.set()
        server.close()
        await server.wait_closed()
