"""The response writer (edge/writer.py): heads, framing, Date, whole and streamed answers."""

from __future__ import annotations

import pytest

from proxy.arp.answers import Answer
from tests.unit.edge.harness import Edge, get, settle

pytestmark = pytest.mark.asyncio


async def _current(edge: Edge, wire: bytes):
    edge.handler.later = True
    client = edge.connect()
    client.send(wire)
    await settle()
    return client, edge.handler.requests[0]


async def test_a_gateway_answer_carries_its_framing_request_id_and_date():
    edge = Edge()
    client, request = await _current(edge, get("/v1/runs/r1", "X-Request-ID: w-1"))
    request.respond(Answer(404, b'{"e": 1}', headers=(("Cache-Control", "no-store"),)))
    request.finish()
    (answer,) = client.answers()
    assert answer.status == 404 and answer.body == b'{"e": 1}'
    assert answer.headers[b"x-request-id"] == b"w-1" and answer.headers[b"cache-control"] == b"no-store"
    assert answer.headers[b"content-length"] == b"8" and answer.headers[b"date"].endswith(b" GMT")
    assert request.status == 404 and request.bytes_out == 8


async def test_a_head_request_gets_the_head_alone():
    edge = Edge()
    client, request = await _current(edge, b"HEAD /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    request.respond(Answer(200, b"0123456789"))
    request.finish()
    raw = bytes(client.transport.written)
    assert raw.endswith(b"\r\n\r\n") and b"Content-Length: 10\r\n" in raw and request.bytes_out == 0


async def test_a_relayed_204_has_no_body_and_a_dated_answer_gets_no_second_date():
    edge = Edge()
    client, request = await _current(edge, get())
    request.relay_whole(204, b"No Content", b"Date: Sun, 06 Dec 2026 22:00:00 GMT\r\n", True, b"ignored")
    request.finish()
    raw = bytes(client.transport.written)
    assert raw.count(b"Date: ") == 1 and b"Content-Length" not in raw and raw.endswith(b"\r\n\r\n")


async def test_a_stream_without_length_is_chunked_on_http11():
    edge = Edge()
    client, request = await _current(edge, get("/v1/runs/r1/events"))
    request.start_stream(200, b"OK", b"Content-Type: text/event-stream\r\n", False, None)
    await request.send(b"data: 1\n\n")
    await request.send(b"")              # nothing: an empty chunk would end the body
    await request.send(b"data: 2\n\n")
    request.end_stream()
    request.finish()
    (answer,) = client.answers()
    assert answer.headers[b"transfer-encoding"] == b"chunked" and answer.body == b"data: 1\n\ndata: 2\n\n"
    assert not client.closed and request.bytes_out == 18


async def test_a_stream_without_length_on_http10_is_delimited_by_closing():
    edge = Edge()
    client, request = await _current(edge, get("/v1/runs/r1/events", version="1.0"))
    request.start_stream(200, b"OK", b"", True, None)
    await request.send(b"data: 1\n\n")
    request.end_stream()
    raw = bytes(client.transport.written)
    assert b"Transfer-Encoding" not in raw and raw.endswith(b"\r\n\r\ndata: 1\n\n")
    assert client.closed


async def test_an_aborted_answer_never_looks_like_a_short_success():
    edge = Edge()
    client, request = await _current(edge, get("/v1/runs/r1/events"))
    request.start_stream(200, b"OK", b"", True, 100)
    await request.send(b"only part")
    request.abort()
    assert client.transport.aborted and request.will_close
