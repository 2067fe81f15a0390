"""The coordinator connection pool on its own: reuse, bounds, staleness, framing, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from proxy.upstream.pool import (
    BadResponse,
    ConnectFailed,
    ConnectionReset,
    StreamIdle,
    UpstreamPool,
)
from tests.support.servers import RawServer


def head(path: str = "/v1/runs/x") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: coordinator\r\n\r\n".encode()


async def ok(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()


@pytest.fixture
async def served():
    servers: list[RawServer] = []
    pools: list[UpstreamPool] = []

    async def make(answer=ok, **options):
        server = RawServer(answer)
        servers.append(server)
        url = await server.start()
        pool = UpstreamPool(url, max_connections=options.pop("max_connections", 4),
                            connect_timeout_s=1, **options)
        pools.append(pool)
        return server, pool

    yield make
    for pool in pools:
        await pool.close()
    for server in servers:
        await server.close()


async def test_sequential_requests_reuse_one_connection(served):
    server, pool = await served()
    for _ in range(5):
        response = await pool.request(head(), None)
        assert (response.status, response.body_if_complete()) == (200, b"{}")
        response.release()
    assert server.connections == 1


async def test_concurrency_is_bounded_by_max_connections(served):
    async def slow(writer):
        await asyncio.sleep(0.05)  # a real server slow enough for requests to overlap
        await ok(writer)

    server, pool = await served(slow, max_connections=2)

    async def one():
        response = await pool.request(head(), None)
        response.release()
        return response.status

    assert await asyncio.gather(*(one() for _ in range(10))) == [200] * 10
    assert server.connections == 2


async def test_idle_connections_expire_before_the_server_drops_them(served):
    server, pool = await served(idle_timeout_s=0.1)
    (await pool.request(head(), None)).release()
    await asyncio.sleep(0.2)  # past the idle timeout: the pool's idle expiry reads time.monotonic(), not an injected clock
    (await pool.request(head(), None)).release()
    assert server.connections == 2


async def test_a_connection_the_server_closed_is_not_reused(served):
    async def once(writer):
        await ok(writer)
        return False                              # closes after one answer

    server, pool = await served(once)
    (await pool.request(head(), None)).release()
    await asyncio.sleep(0.05)                    # the FIN arrives while the connection idles
    response = await pool.request(head(), None)
    assert response.status == 200
    assert server.connections == 2


async def test_connection_close_responses_are_not_pooled(served):
    async def closing(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    server, pool = await served(closing)
    for _ in range(2):
        response = await pool.request(head(), None)
        assert response.keep_alive is False
        response.release()
    assert server.connections == 2


async def test_refused_connection_is_a_connect_failure_that_never_sent(served):
    server, pool = await served()
    await server.close()
    with pytest.raises(ConnectFailed) as info:
        await pool.request(head(), None)
    assert info.value.sent is False and info.value.kind == "connect"


async def test_close_before_any_answer_is_a_reset(served):
    async def hang_up(writer):
        return False

    _, pool = await served(hang_up)
    with pytest.raises(ConnectionReset) as info:
        await pool.request(head(), None)
    assert info.value.sent is True


async def test_garbage_is_a_protocol_error(served):
    async def garbage(writer):
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    _, pool = await served(garbage)
    with pytest.raises(BadResponse):
        await pool.request(head(), None)


async def test_chunked_body_streams_chunk_by_chunk_and_truncation_is_an_error(served):
    gate = asyncio.Event()

    async def chunked(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nline1\n\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"6\r\nline2\n\r\n")        # then dies without the last chunk
        await writer.drain()
        return False

    _, pool = await served(chunked)
    response = await pool.request(head(), None)
    chunks = response.chunks(idle_timeout_s=5)
    assert await anext(chunks) == b"line1\n"     # before the server sends line 2
    gate.set()
    assert await anext(chunks) == b"line2\n"
    with pytest.raises(ConnectionReset):
        await anext(chunks)
    response.close()


async def test_idle_stream_times_out(served):
    async def silent(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # silent past the pool's real stream idle timeout

    _, pool = await served(silent)
    response = await pool.request(head(), None)
    with pytest.raises(StreamIdle):
        async for _ in response.chunks(idle_timeout_s=0.2):
            pass
    response.close()


async def test_a_slow_reader_pauses_the_coordinator_socket(served):
    big = b"x" * (4 * 1024 * 1024)

    async def flood(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        await writer.drain()

    _, pool = await served(flood)
    response = await pool.request(head(), None)
    await asyncio.sleep(0.3)                      # nobody reads: buffering must stop near the high water
    assert response._buffered < 1024 * 1024
    received = 0
    async for chunk in response.chunks(idle_timeout_s=5):
        received += len(chunk)
    assert received == len(big)
    response.release()


async def test_request_body_goes_in_the_same_write_with_the_length_the_head_declares(served):
    server, pool = await served()
    request = b"POST /v1/runs/x:cancel HTTP/1.1\r\nHost: c\r\nContent-Length: 7\r\n\r\n"
    response = await pool.request(request, b"abcdefg")
    response.release()
    assert server.requests == [request + b"abcdefg"]


@pytest.mark.parametrize("second", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"x\": 1}\n",   # a whole answer with headers
    b"HTTP/1.1 204 No Content\r\n\r\n",                              # no headers at all
    b"HTTP/1.1 200 \r\nX-Forged: 1\r\nContent-Length: 0\r\n\r\n",     # an empty reason phrase
])
async def test_an_unrequested_second_response_is_never_handed_out_and_the_connection_is_dropped(served, second):
    async def two_answers(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" + second)
        await writer.drain()

    server, pool = await served(two_answers)
    response = await pool.request(head(), None)
    assert (response.status, response.body_if_complete()) == (200, b"{}")
    assert response.headers == [(b"Content-Length", b"2")]  # nothing of the second answer
    response.release()
    # The connection that carried the extra answer is not reused: the next request opens a new one.
    response = await pool.request(head(), None)
    assert response.body_if_complete() == b"{}"
    response.release()
    assert server.connections == 2
