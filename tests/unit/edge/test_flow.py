"""Flow control through a fake transport (edge/flow.py): reading held and resumed, writing paused and drained."""

from __future__ import annotations

import asyncio

import pytest

from proxy.edge.errors import ClientGone
from tests.unit.edge.harness import HIGH_WATER, Edge, get, post, settle

pytestmark = pytest.mark.asyncio


async def _streaming(edge: Edge) -> tuple:
    edge.handler.later = True
    client = edge.connect()
    client.send(get("/v1/runs/r1/events"))
    await settle()
    request = edge.handler.requests[0]
    request.start_stream(200, b"OK", b"Content-Type: text/event-stream\r\n", True, None)
    return client, request


async def test_a_stream_waits_while_the_client_does_not_read_and_goes_on_when_it_does():
    edge = Edge()
    client, request = await _streaming(edge)
    client.transport.stall()
    sent = asyncio.ensure_future(request.send(b"x" * (HIGH_WATER + 1)))
    await settle()
    assert not sent.done(), "send returned while the client's buffer is full"
    assert client.conn.send_deadline > 0
    client.transport.flush()
    await settle()
    assert sent.done() and sent.exception() is None
    assert client.conn.send_deadline == 0.0 and not client.conn.write_paused


async def test_a_stream_waiting_to_drain_learns_that_the_client_left():
    edge = Edge()
    client, request = await _streaming(edge)
    client.transport.stall()
    sent = asyncio.ensure_future(request.send(b"x" * (HIGH_WATER + 1)))
    await settle()
    client.leave()
    await settle()
    assert isinstance(sent.exception(), ClientGone)


async def test_the_next_pipelined_request_waits_until_a_slow_reader_has_taken_the_answer():
    edge = Edge()
    client = edge.connect()
    client.transport.stall()
    edge.handler.later = True
    client.send(get("/v1/runs/a") + get("/v1/runs/b"))
    await settle()
    first = edge.handler.requests[0]
    client.conn.write(b"x" * (HIGH_WATER + 1))  # the first answer is large and unread
    edge.handler.release(first)
    await settle()
    assert len(edge.handler.requests) == 1, "the next request began while the client reads nothing"
    client.transport.flush()
    await settle()
    assert len(edge.handler.requests) == 2


async def test_a_full_budget_holds_reading_on_every_connection_until_it_has_room():
    edge = Edge(max_buffered_bytes=8192, header_timeout_s=100)
    quiet, busy = edge.connect(), edge.connect()
    busy.send(b"GET /v1/runs/r1 HTTP/1.1\r\nX-Fill: " + b"a" * 8200)  # a head still arriving, charged as it comes
    assert edge.listener.budget.full
    assert not quiet.transport.reading and not busy.transport.reading
    busy.leave()  # what it held is given back
    await settle()
    assert not edge.listener.budget.full and edge.listener.budget.used == 0
    assert quiet.transport.reading


async def test_a_body_whose_bytes_are_reserved_is_read_while_the_budget_is_full():
    edge = Edge(max_buffered_bytes=8192, header_timeout_s=100, body_timeout_s=100)
    uploader, other = edge.connect(), edge.connect()
    uploader.send(post("/v1/runs", b"", length=6000))   # reserved whole at its head
    other.send(b"GET /v1/runs/r1 HTTP/1.1\r\nX-Fill: " + b"a" * 2200)  # fills the rest
    assert edge.listener.budget.full
    assert uploader.transport.reading and not other.transport.reading
    uploader.send(b"a" * 6000)
    await settle()
    assert uploader.answers()[0].body == b"POST /v1/runs 6000"


async def test_a_body_that_does_not_fit_waits_for_room_then_is_read():
    edge = Edge(max_buffered_bytes=8192, header_timeout_s=100, body_timeout_s=100)
    filler, uploader = edge.connect(), edge.connect()
    filler.send(b"GET /v1/runs/r1 HTTP/1.1\r\nX-Fill: " + b"a" * 5000)
    uploader.send(post("/v1/runs", b"", length=6000))
    await settle()
    assert not uploader.transport.reading, "a body read that the budget has no room for"
    filler.leave()
    await settle()
    assert uploader.transport.reading
    uploader.send(b"a" * 6000)
    await settle()
    assert uploader.answers()[0].body == b"POST /v1/runs 6000"


async def test_a_body_starved_of_the_budget_until_its_timeout_is_a_retryable_overload():
    edge = Edge(max_buffered_bytes=8192, header_timeout_s=100, body_timeout_s=2)
    filler, uploader = edge.connect(), edge.connect()
    filler.send(b"GET /v1/runs/r1 HTTP/1.1\r\nX-Fill: " + b"a" * 5000)
    uploader.send(post("/v1/runs", b"", length=6000))
    await settle()
    edge.advance(2.1)
    await settle()
    assert edge.handler.body_errors == ["Overloaded"] and edge.metrics.overloads == ["body"]


async def test_a_head_starved_of_the_budget_until_its_timeout_gets_503():
    edge = Edge(max_buffered_bytes=8192, header_timeout_s=2)
    filler, starved = edge.connect(), edge.connect()
    starved.send(b"GET /v1/runs/r1 HTTP/1.1\r\n")
    filler.send(b"GET /v1/runs/r1 HTTP/1.1\r\nX-Fill: " + b"a" * 8200)
    edge.advance(2.1)
    await settle()
    (answer,) = starved.answers()
    assert answer.status == 503 and answer.reason == "buffer_budget_full" and answer.json()["error"]["retryable"]


async def test_a_body_whose_reservation_fills_the_budget_is_still_read():
    """Reserving its bytes may itself fill the budget and hold every connection: not the one reserved for,
    whose bytes are paid for (else it would wait for room only its own answer can give, then time out)."""
    edge = Edge(max_buffered_bytes=8192, header_timeout_s=100, body_timeout_s=100)
    uploader = edge.connect()
    head = 8 + (4 + 2 + 4) + (12 + 16 + 4) + (14 + 4 + 4)   # what the budget counts of post()'s head
    uploader.send(post("/v1/runs", b"", length=8192 - head))
    assert edge.listener.budget.full and edge.listener.budget.used == 8192
    assert uploader.transport.reading, "the body the budget was filled for is not read"
    uploader.send(b"a" * (8192 - head))
    await settle()
    assert uploader.answers()[0].body == b"POST /v1/runs %d" % (8192 - head)
