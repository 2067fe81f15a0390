"""One principal cannot take the whole coordinator pool with event streams (issue 15).

`limits.max_streams_per_principal` bounds the streams one caller holds open
(429 too_many_streams past it, never forwarded); `upstream.stream_share` bounds
the pool connections all streams together hold, so GETs and run starts still
get a connection. Both counts must come back at every end of a stream. The
coordinator is a raw asyncio server on 127.0.0.1 whose streams stay open until
the test ends them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.settings.config import ConfigError, build_config
from proxy.upstream.pool import UpstreamPool
from tests.support.rawhttp import RawConnection, Response, read_response, request
from tests.support.relay import reset

GOOD = b'{"run_id":"r1","state":"running"}'


class StreamingCoordinator:
    """Event streams answer a chunked head and one line, then stay open until `end(...)`; anything else
    gets a Run at once. Each stream's connection is closed after it (`Connection: close`)."""

    def __init__(self) -> None:
        self.streams: list[asyncio.StreamWriter] = []
        self.event_requests = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/events " in head.split(b"\r\n", 1)[0]:
                    self.event_requests += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\nb\r\n{\"seq\": 1}\n\r\n")
                    self.streams.append(writer)
                    await writer.drain()
                    await reader.read()  # until the gateway closes it, or the test ends the stream
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(GOOD), GOOD))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def finish(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        for writer in self.streams:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def coordinator() -> AsyncIterator[StreamingCoordinator]:
    server = StreamingCoordinator()
    yield server
    await server.close()


@pytest.fixture
async def streams_gw(gateway, issuer, coordinator):
    async def start(**sections: Any) -> str:
        upstream = {"queue_timeout_s": 0.3, "stream_idle_timeout_s": 5, **sections.pop("upstream", {})}
        return await gateway(await coordinator.start(), upstream=upstream,
                             auth={"mode": "optional",
                                   "issuers": [{"issuer": issuer.url, "audiences": ["arp-run-gateway"]}]},
                             metrics={"enabled": True, "port": 0}, **sections)
    return start


class Stream:
    def __init__(self, conn: RawConnection, status: int, answer: Response | None) -> None:
        self.conn, self.status, self.answer = conn, status, answer

    async def ended_cleanly(self) -> bool:
        """Reads to the end of the gateway's answer: whether it ended with the last chunk, not broken off."""
        try:
            await asyncio.wait_for(self.conn.reader.readuntil(b"\r\n0\r\n\r\n"), 5)
        except (ConnectionError, asyncio.IncompleteReadError):
            return False
        return True


async def open_stream(url: str, token: str | None = None, run: str = "r1") -> Stream:
    """Opens an event stream and reads its head (and the whole answer when it is a refusal)."""
    conn = await RawConnection.open(url)
    headers = [("Authorization", f"Bearer {token}")] if token else []
    await conn.send(request("GET", f"/v1/runs/{run}/events", headers))
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        return Stream(conn, status, None)
    reader = asyncio.StreamReader()
    reader.feed_data(head + await asyncio.wait_for(conn.reader.readexactly(_length(head)), 5))
    reader.feed_eof()
    answer = await read_response(reader)
    await conn.close()
    return Stream(conn, status, answer)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def get_run(url: str) -> Response:
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/r1"))
        resp = await conn.response()
    assert resp is not None
    return resp


def refused(stream: Stream, status: int, code: str) -> dict:
    assert stream.answer is not None, f"expected {status} {code}, got a stream"
    error = stream.answer.envelope()
    assert stream.status == status and error is not None, stream.answer.describe()
    assert error["code"] == code, error
    return error


async def metric(url: str, name: str) -> float:
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/metrics"))
        resp = await conn.response()
    assert resp is not None
    for line in resp.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def test_one_principal_past_its_stream_limit_gets_429_and_others_do_not(streams_gw, issuer, coordinator):
    url = await streams_gw(limits={"max_streams_per_principal": 2})
    alice, bob = issuer.mint(sub="alice"), issuer.mint(sub="bob")
    held = [await open_stream(url, alice), await open_stream(url, alice)]
    assert [s.status for s in held] == [200, 200]
    error = refused(await open_stream(url, alice), 429, "too_many_streams")
    assert error["retryable"] is True and error["details"]["max_streams"] == 2
    assert coordinator.event_requests == 2  # the refused stream never left
    # Bob, and anonymous callers (keyed by client address), count on their own.
    others = [await open_stream(url, bob), await open_stream(url), await open_stream(url)]
    assert [s.status for s in others] == [200, 200, 200]
    refused(await open_stream(url), 429, "too_many_streams")
    assert await metric(url, "arp_gateway_streams_refused_total") == 2
    for stream in held + others:
        await stream.conn.close()


async def test_streams_at_their_pool_share_leave_connections_for_gets(streams_gw, coordinator):
    """max_connections 4, stream_share 0.5: two streams at most hold coordinator connections; a third waits
    like a busy pool and is shed, and GETs still get theirs."""
    url = await streams_gw(upstream={"max_connections": 4, "stream_share": 0.5})
    streams = await asyncio.gather(*(open_stream(url, run=f"r{i}") for i in range(4)))
    assert sorted(s.status for s in streams) == [200, 200, 503, 503]
    for stream in streams:
        if stream.status == 503:
            refused(stream, 503, "run_coordinator_busy")
    assert coordinator.event_requests == 2
    gets = await asyncio.gather(*(get_run(url) for _ in range(4)))
    assert [(r.status, r.body) for r in gets] == [(200, GOOD)] * 4
    assert await metric(url, "arp_gateway_upstream_stream_connections") == 2
    for stream in streams:
        await stream.conn.close()


async def _released(url: str, token: str, nudge: Callable[[], None]) -> Stream:
    """A new stream once the gateway has noticed the end of the last one; bounded in tries and time."""
    for _ in range(40):
        nudge()
        stream = await open_stream(url, token)
        if stream.status == 200:
            return stream
        await asyncio.sleep(0.05)  # the gateway frees the slot once it sees the real socket close
    raise AssertionError(f"the stream count never came back: last answer {stream.status}")


@pytest.mark.parametrize("end", ["finished", "client_gone", "coordinator_reset", "idle_timeout"])
async def test_both_counts_come_back_at_every_end_of_a_stream(streams_gw, issuer, coordinator, end):
    """One stream per principal and one stream slot in the pool (max_connections 2, share 0.5): a second
    stream is refused until the first ends, however it ends."""
    idle = 1.0 if end == "idle_timeout" else 5  # above queue_timeout_s: the 503 below comes first
    url = await streams_gw(limits={"max_streams_per_principal": 1},
                           upstream={"max_connections": 2, "stream_share": 0.5, "stream_idle_timeout_s": idle})
    alice = issuer.mint(sub="alice")
    first = await open_stream(url, alice)
    assert first.status == 200
    refused(await open_stream(url, alice), 429, "too_many_streams")
    assert (await open_stream(url, issuer.mint(sub="bob"))).status == 503  # the pool's one stream slot is taken
    writer = coordinator.streams[0]

    def nudge() -> None:
        pass

    if end == "finished":
        coordinator.finish(writer)
        assert await first.ended_cleanly()
    elif end == "client_gone":
        await first.conn.close()

        def nudge() -> None:
            # A silent stream's client is found gone at the next event line the gateway writes to it.
            if not writer.is_closing():
                writer.write(b"b\r\n{\"seq\": 2}\n\r\n")
    else:
        if end == "coordinator_reset":
            reset(writer)
        # (idle_timeout: the gateway cuts the silent stream itself)
        assert not await first.ended_cleanly()
    second = await _released(url, alice, nudge)
    assert await metric(url, "arp_gateway_upstream_stream_connections") == 1
    await second.conn.close()
    await first.conn.close()


# --------------------------------------------------------------------------- configuration


def test_the_keys_default_to_the_documented_values():
    cfg = build_config({"auth": {"mode": "disabled"}})
    assert cfg.limits.max_streams_per_principal == 8
    assert cfg.upstream.stream_share == 0.75
    assert cfg.upstream.max_response_header_bytes == 65536


@pytest.mark.parametrize("section, value, problem", [
    ("limits", {"max_streams_per_principal": 0}, "limits.max_streams_per_principal: must be >= 1"),
    ("limits", {"max_streams_per_principal": 1.5}, "limits.max_streams_per_principal: not an integer"),
    ("upstream", {"stream_share": 0}, "upstream.stream_share: must be > 0"),
    ("upstream", {"stream_share": 1.5}, "upstream.stream_share: must be a fraction in (0, 1]"),
    ("upstream", {"stream_share": "half"}, "upstream.stream_share: not a number"),
    ("upstream", {"max_response_header_bytes": 100}, "upstream.max_response_header_bytes: must be >= 1024"),
])
def test_a_bad_value_fails_at_start_up_naming_the_key(section, value, problem):
    with pytest.raises(ConfigError) as caught:
        build_config({"auth": {"mode": "disabled"}, section: value})
    assert [p for p in caught.value.problems if p.startswith(problem)], caught.value.problems


def test_streams_get_at_least_one_slot_and_a_share_of_1_keeps_none_back():
    assert UpstreamPool("http://127.0.0.1:1", max_connections=1, connect_timeout_s=1,
                        stream_share=0.5).stream_slots == 1
    assert UpstreamPool("http://127.0.0.1:1", max_connections=10, connect_timeout_s=1,
                        stream_share=1.0).stream_slots == 10
