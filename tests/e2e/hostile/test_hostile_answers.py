"""A hostile coordinator's answers, held to the standard the client's requests are held to (issue 15).

Each coordinator here is a raw asyncio server on 127.0.0.1 writing exactly the
bytes a test gives it; the client side reads the gateway's answer with the
strict reader of tests/support/rawhttp.py, so an answer the gateway framed
badly fails the test there. After each hostile answer a well-formed one must
come through the same gateway: nothing the coordinator sent may break it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.support.rawhttp import MalformedResponse, RawConnection, Response, request
from tests.support.servers import RawServer

GOOD = b'{"run_id":"r1","state":"running"}'
GOOD_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(GOOD), GOOD))
Script = Callable[[asyncio.StreamWriter], Any]


class Coordinator:
    """Answers the n-th request with the n-th script (bytes, or a coroutine function of the writer);
    past the scripts, with a well-formed 200. A script returning False closes the connection."""

    def __init__(self, *scripts: bytes | Script) -> None:
        self.scripts = list(scripts)
        self.server = RawServer(self._answer)

    async def _answer(self, writer: asyncio.StreamWriter) -> Any:
        script = self.scripts.pop(0) if self.scripts else GOOD_ANSWER
        if isinstance(script, bytes):
            writer.write(script)
            await writer.drain()
            return None
        return await script(writer)

    @property
    def connections(self) -> int:
        return self.server.connections


@pytest.fixture
async def through(gateway) -> AsyncIterator[Callable[..., Any]]:
    """`url, coordinator = await through(*scripts, upstream={...})`."""
    made: list[Coordinator] = []

    async def start(*scripts: bytes | Script, **sections: Any) -> tuple[str, Coordinator]:
        coordinator = Coordinator(*scripts)
        made.append(coordinator)
        upstream = {"request_timeout_s": 3, "stream_idle_timeout_s": 3, "retries": {"attempts": 1},
                    **sections.pop("upstream", {})}
        return await gateway(await coordinator.server.start(), upstream=upstream, **sections), coordinator

    yield start
    for coordinator in made:
        await coordinator.server.close()


async def ask(url: str, target: str = "/v1/runs/r1") -> Response:
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", target))
        resp = await conn.response()
    assert resp is not None, "the gateway closed without answering"
    return resp


async def still_serves(url: str) -> None:
    resp = await ask(url)
    assert (resp.status, resp.body) == (200, GOOD), resp.describe()


def bad_response(resp: Response) -> None:
    error = resp.envelope()
    assert resp.status == 502 and error is not None, resp.describe()
    assert error["code"] == "run_coordinator_bad_response", error


def then_close(*parts: bytes, pause: float = 0.0) -> Script:
    async def script(writer: asyncio.StreamWriter) -> bool:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)  # the pieces arrive as separate reads
        return False
    return script


# --------------------------------------------------------------------------- close-delimited bodies


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["whole", "in-pieces"])
async def test_a_close_delimited_body_is_complete_at_the_close_and_its_connection_not_reused(through, pause):
    """RFC 9112 6.3 rule 8: an HTTP/1.0 answer without a length ends where the coordinator closes.
    The client gets a cleanly ended body, not a broken one."""
    lines = [b'{"seq":1}\n', b'{"seq":2}\n']
    url, coordinator = await through(then_close(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n",
                                                *lines, pause=pause))
    resp = await ask(url, "/v1/runs/r1/events")
    assert (resp.status, resp.body) == (200, b"".join(lines)), resp.describe()
    await still_serves(url)
    assert coordinator.connections == 2


async def test_an_answer_with_a_transfer_coding_other_than_chunked_is_502_not_relayed_as_plain_bytes(through):
    """`Transfer-Encoding: gzip` frames a body by the close too, but its bytes are gzip: relayed
    without the coding (a hop-by-hop header) the client would take them for the content."""
    url, _ = await through(then_close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00rest"))
    bad_response(await ask(url))
    await still_serves(url)


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"gzip\r\nTransfer-Encoding: chunked"])
async def test_a_kept_alive_chunked_answer_with_another_coding_first_is_502(through, codings):
    """`gzip, chunked` on a kept-alive answer: llhttp undoes the chunking and leaves gzip bytes,
    which relayed without the coding the client would take for the content."""
    body = b"\x1f\x8b\x08\x00rest"
    url, _ = await through(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n"
                           b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    bad_response(await ask(url))
    await still_serves(url)


# --------------------------------------------------------------------------- trailers


async def test_coordinator_trailers_never_reach_the_client_as_headers(through):
    url, _ = await through(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                           b"Trailer: Set-Cookie, WWW-Authenticate\r\n\r\n"
                           b"%x\r\n%s\r\n0\r\nSet-Cookie: session=forged\r\nWWW-Authenticate: Basic realm=x\r\n"
                           b"X-Trailer: 1\r\n\r\n" % (len(GOOD), GOOD))
    resp = await ask(url)
    assert (resp.status, resp.body) == (200, GOOD)
    for name in ("Set-Cookie", "WWW-Authenticate", "X-Trailer"):
        assert resp.header(name) is None, f"trailer {name} relayed as a header: {resp.describe()}"
    await still_serves(url)


# --------------------------------------------------------------------------- unbounded heads


async def test_a_16_mib_header_value_is_502(through):
    url, _ = await through(then_close(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * (16 << 20) + b"\r\nContent-Length: 0"
                                      b"\r\n\r\n"))
    bad_response(await ask(url))
    await still_serves(url)


async def test_200_000_header_lines_are_502(through):
    url, _ = await through(then_close(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200_000 + b"Content-Length: 0\r\n\r\n"))
    bad_response(await ask(url))
    await still_serves(url)


async def test_interim_answers_count_toward_the_bound(through):
    url, _ = await through(then_close(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * 20_000
                                      + GOOD_ANSWER))
    bad_response(await ask(url))
    await still_serves(url)


async def test_the_bound_is_upstream_max_response_header_bytes(through):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Pad: %s\r\n\r\n"
    url, _ = await through(head % (len(GOOD), b"p" * 1500) + GOOD, head % (len(GOOD), b"p" * 2500) + GOOD,
                           upstream={"max_response_header_bytes": 2048})
    assert (await ask(url)).status == 200
    bad_response(await ask(url))
    await still_serves(url)


# --------------------------------------------------------------------------- status lines


async def test_101_switching_protocols_is_502(through):
    url, _ = await through(then_close(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                      b"Connection: Upgrade\r\n\r\n\x81\x05hello"))
    bad_response(await ask(url))
    await still_serves(url)


@pytest.mark.parametrize("status", [b"999", b"600", b"000"])
async def test_a_status_outside_100_to_599_is_502(through, status):
    url, _ = await through(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD))
    bad_response(await ask(url))
    await still_serves(url)


@pytest.mark.parametrize("reason", [b"O\x00K", b"Totally Fine\x7f", b"", b"Created"])
async def test_the_reason_phrase_is_the_gateways_own(through, reason):
    url, _ = await through(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD))
    resp = await ask(url)
    assert (resp.status, resp.reason, resp.body) == (200, "OK", GOOD)


async def test_interim_1xx_answers_are_skipped_and_their_headers_dropped(through):
    url, _ = await through(b"HTTP/1.1 100 Continue\r\n\r\n"
                           b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + GOOD_ANSWER)
    resp = await ask(url)
    assert (resp.status, resp.body, resp.interim) == (200, GOOD, []), resp.describe()
    assert resp.header("Link") is None
    await still_serves(url)


async def test_a_trailer_flood_ends_the_clients_answer_abnormally(through):
    """llhttp holds a trailer line until it ends: 16 MiB of one is bounded like a head, and the answer,
    whose body already went out, ends broken rather than as a clean success."""
    async def flood(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\nX-Flood: " % (len(GOOD), GOOD))
        await writer.drain()
        for _ in range(256):
            writer.write(b"f" * 65536)
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()
        return False

    url, _ = await through(flood)
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/r1/events"))
        with pytest.raises((MalformedResponse, asyncio.IncompleteReadError, ConnectionError)):
            await conn.response()
    await still_serves(url)
