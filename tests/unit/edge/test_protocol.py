"""The connection protocol driven through a fake transport and a fake clock (edge/protocol.py).

Keep-alive, pipelining order, every timeout and the refusals decided at the
edge, with no socket and no sleep: bytes go in through `data_received`, time
moves when the test says so, and the sweep runs by hand. The socket-level
suites in tests/e2e/edge hold the same behaviour end to end.
"""

from __future__ import annotations

import pytest

from proxy.edge.protocol import LINGER_S, MAX_PIPELINED, Phase
from tests.unit.edge.harness import Edge, get, post, settle

pytestmark = pytest.mark.asyncio


# --------------------------------------------------------------------------- keep-alive and close


async def test_keep_alive_answers_requests_one_after_another_on_one_connection():
    edge = Edge()
    client = edge.connect()
    for i in range(3):
        client.send(get(f"/v1/runs/r{i}", f"X-Request-ID: ka-{i}"))
    answers = client.answers()
    assert [(a.status, a.body, a.headers[b"x-request-id"]) for a in answers] == [
        (200, b"GET /v1/runs/r%d 0" % i, b"ka-%d" % i) for i in range(3)]
    assert all(b"connection" not in a.headers for a in answers)
    assert not client.closed and client.conn.phase is Phase.IDLE


async def test_connection_close_closes_after_the_answer():
    edge = Edge()
    client = edge.connect()
    client.send(get("/v1/runs/r1", "Connection: close"))
    (answer,) = client.answers()
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    assert client.closed
    await settle()
    assert client.transport.lost and not edge.listener.connections


async def test_http10_closes_unless_it_asks_for_keep_alive():
    edge = Edge()
    plain, kept = edge.connect(), edge.connect()
    plain.send(get("/v1/runs/r1", version="1.0"))
    kept.send(get("/v1/runs/r1", "Connection: keep-alive", version="1.0"))
    assert plain.answers()[0].status == 200 and plain.closed
    assert kept.answers()[0].headers[b"connection"] == b"keep-alive" and not kept.closed


async def test_a_body_that_arrives_in_pieces_is_answered_once_whole():
    edge = Edge()
    client = edge.connect()
    body = b'{"run": "a body in three reads"}'
    wire = post("/v1/runs", body)
    client.send(wire[:-20])
    client.send(wire[-20:-5])
    await settle()
    assert client.answers() == []
    client.send(wire[-5:])
    await settle()
    (answer,) = client.answers()
    assert answer.body == b"POST /v1/runs %d" % len(body)


async def test_expect_continue_is_answered_before_the_body_is_read():
    edge = Edge()
    client = edge.connect()
    client.send(post("/v1/runs", b"", "Expect: 100-continue", length=4))
    await settle()
    assert bytes(client.transport.written) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"abcd")
    await settle()
    assert [a.status for a in client.answers()] == [100, 200]


# --------------------------------------------------------------------------- pipelining


async def test_pipelined_requests_are_handed_over_one_at_a_time_and_answered_in_order():
    edge = Edge()
    edge.handler.later = True
    client = edge.connect()
    client.send(get("/v1/runs/a") + post("/v1/runs", b"{}") + get("/v1/runs/c"))
    await settle()
    # The second is parsed already, but the gateway sees it only once the first is answered.
    assert [r.target for r in edge.handler.requests] == [b"/v1/runs/a"]
    first = edge.handler.requests[0]
    edge.handler.release(first)
    await settle()
    assert [r.target for r in edge.handler.requests] == [b"/v1/runs/a", b"/v1/runs"]
    edge.handler.release(edge.handler.requests[1])
    await settle()
    edge.handler.release(edge.handler.requests[2])
    await settle()
    assert [a.body for a in client.answers()] == [b"GET /v1/runs/a 0", b"POST /v1/runs 2", b"GET /v1/runs/c 0"]
    assert not client.closed


async def test_a_read_with_more_requests_than_the_queue_holds_is_parsed_as_the_queue_empties():
    edge = Edge()
    edge.handler.later = True
    client = edge.connect()
    count = MAX_PIPELINED + 5
    client.send(b"".join(get(f"/v1/runs/r{i}") for i in range(count)))
    await settle()
    assert not client.transport.reading, "reading goes on while requests wait unparsed"
    for i in range(count):
        edge.handler.release(edge.handler.requests[i])
        await settle()
    assert [a.body for a in client.answers()] == [b"GET /v1/runs/r%d 0" % i for i in range(count)]
    assert client.transport.reading and not client.closed


async def test_bytes_held_unparsed_behind_a_full_pipeline_count_against_the_budget():
    # What waits unparsed is memory like a head or a body: one read per connection, up to the read
    # size, which connections by the thousand would otherwise hold outside limits.max_buffered_bytes.
    edge = Edge()
    edge.handler.later = True
    client = edge.connect()
    budget = edge.listener.budget
    junk = b"X" * 100_000
    client.send(b"".join(get(f"/v1/runs/r{i}") for i in range(MAX_PIPELINED + 1)) + junk)
    await settle()
    assert budget.used >= len(junk), "held bytes are outside the budget"
    client.transport._lose()
    await settle()
    assert budget.used == 0


async def test_a_whole_request_waiting_its_turn_stops_reading_until_the_connection_is_free():
    edge = Edge()
    edge.handler.later = True
    client = edge.connect()
    client.send(get("/v1/runs/a"))
    await settle()
    client.send(get("/v1/runs/b"))
    assert client.transport.reading_calls == ["pause"]
    edge.handler.release(edge.handler.requests[0])
    await settle()
    assert client.transport.reading_calls == ["pause"]  # b is being answered: still one at a time
    edge.handler.release(edge.handler.requests[1])
    await settle()
    assert client.transport.reading_calls == ["pause", "resume"] and len(client.answers()) == 2


# --------------------------------------------------------------------------- timeouts


async def test_a_head_that_never_ends_is_closed_at_the_header_timeout_and_not_before():
    edge = Edge(header_timeout_s=2)
    client = edge.connect()
    client.send(b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n")
    edge.advance(1.9)
    assert not client.closed
    edge.advance(0.2)
    assert client.closed and client.answers() == []
    assert edge.metrics.events == [("connections_closed", "header_timeout")]


async def test_an_idle_connection_is_closed_at_the_keepalive_timeout():
    edge = Edge(keepalive_timeout_s=5, header_timeout_s=1)
    client = edge.connect()
    client.send(get())
    edge.advance(4.9)  # past the header timeout: idle since the answer, the keep-alive one applies
    assert not client.closed
    client.send(get())  # a request restarts nothing but the header clock, then idles again
    edge.advance(4.9)
    assert not client.closed
    edge.advance(0.2)
    assert client.closed and len(client.answers()) == 2
    assert edge.metrics.events == [("connections_closed", "keepalive_timeout")]


async def test_a_body_that_stops_arriving_ends_in_body_timeout():
    edge = Edge(body_timeout_s=3)
    client = edge.connect()
    client.send(post("/v1/runs", b"{", length=10))
    await settle()
    edge.advance(2.9)
    await settle()
    assert edge.handler.body_errors == []
    edge.advance(0.2)
    await settle()
    assert edge.handler.body_errors == ["BodyTimeout"]
    (answer,) = client.answers()
    assert answer.status == 400 and answer.headers[b"connection"] == b"close"
    assert ("connections_closed", "body_timeout") in edge.metrics.events


async def test_unsent_answer_bytes_get_the_send_timeout_then_the_connection_is_aborted():
    edge = Edge(send_timeout_s=4)
    client = edge.connect()
    client.transport.stall()
    edge.handler.later = True
    client.send(get())
    await settle()
    request = edge.handler.requests[0]
    request.start_stream(200, b"OK", b"", False, None)
    client.conn.write(b"x" * (2 * 64 * 1024))  # past the high-water mark: pause_writing
    assert client.conn.write_paused
    edge.advance(3.9)
    assert not client.transport.aborted
    edge.advance(0.2)
    assert client.transport.aborted
    assert edge.metrics.events == [("connections_closed", "send_timeout")]
    await settle()
    assert edge.handler.abandoned_ == [(request.request_id, 499)]


async def test_a_refused_body_lingers_then_is_aborted_after_linger_s():
    edge = Edge(max_body_bytes=8, header_timeout_s=100, keepalive_timeout_s=100)
    client = edge.connect()
    client.send(post("/v1/runs", b"0123456789" * 2)[:-4])
    await settle()
    (answer,) = client.answers()
    assert answer.status == 400 and edge.handler.body_errors == ["BodyTooLarge"]
    # Half-closed: the answer, then a FIN, while what the client still sends is read and dropped.
    assert client.transport.eof_written and not client.transport.aborted
    client.send(b"more of the body")
    edge.advance(LINGER_S - 0.1)
    assert not client.transport.aborted
    edge.advance(0.2)
    assert client.transport.aborted


async def test_a_request_that_waits_for_the_gateway_has_no_deadline_at_the_edge():
    edge = Edge(header_timeout_s=1, keepalive_timeout_s=1, body_timeout_s=1)
    edge.handler.later = True
    client = edge.connect()
    client.send(get())
    await settle()
    edge.advance(50)
    assert not client.closed
    edge.handler.release(edge.handler.requests[0])
    await settle()
    assert client.answers()[0].status == 200


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("wire", "status", "reason"), [
    (b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414, "target_too_long"),
    (b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n" + b"X-A: 1\r\n" * 20 + b"\r\n", 431, "too_many_headers"),
    (b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "unsupported_transfer_coding"),
    (b"BREW /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n\r\n", 501, "unknown_method"),
    (b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "bad_framing"),
    (b"GET /v1 runs HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "malformed_request"),
    (b"GET /v1/runs/r#1 HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "invalid_target"),
    (b"GET /v1/runs/r1 HTTP/1.1\r\n\r\n", 400, "invalid_host"),
    (b"GET http://other/v1/runs/r1 HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "invalid_host"),
    (b"POST /v1/runs HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_framing"),
])
async def test_the_edge_refuses_with_an_error_envelope(wire, status, reason):
    edge = Edge(max_header_bytes=1024, max_headers=10)
    client = edge.connect()
    client.send(wire)
    await settle()
    answers = client.answers()
    assert [a.status for a in answers] == [status]
    assert answers[0].reason == reason
    assert edge.handler.requests[0].refusal is not None


async def test_a_refused_head_closes_the_connection_and_parses_nothing_after_it():
    edge = Edge()
    client = edge.connect()
    client.send(b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n" + get("/v1/runs/r2"))
    await settle()
    assert [a.status for a in client.answers()] == [501]
    assert [r.target for r in edge.handler.requests if r.refusal is None] == []
    # Half-closed rather than closed: what the client may still send must not reset the answer away.
    assert client.conn.closed and client.transport.eof_written


async def test_a_request_that_is_refused_in_a_pipeline_is_answered_in_its_turn():
    edge = Edge()
    client = edge.connect()
    client.send(get("/v1/runs/a") + b"GET /v1/runs/# HTTP/1.1\r\nHost: gw\r\n\r\n" + get("/v1/runs/c"))
    await settle()
    assert [a.status for a in client.answers()] == [200, 400, 200]


async def test_the_client_leaving_mid_answer_is_reported_as_499():
    edge = Edge()
    edge.handler.later = True
    client = edge.connect()
    client.send(get("/v1/runs/r1", "X-Request-ID: gone-1"))
    await settle()
    client.leave()
    await settle()
    assert edge.handler.abandoned_ == [("gone-1", 499)]
    assert not edge.listener.connections


async def test_a_handler_that_fails_gets_a_500_and_the_connection_closes():
    edge = Edge()
    edge.handler.fail = True
    client = edge.connect()
    client.send(get("/v1/runs/r1", "X-Request-ID: fail-1"))
    (answer,) = client.answers()
    assert answer.status == 500 and answer.json()["error"]["code"] == "internal_error"
    assert edge.handler.abandoned_ == [("fail-1", 500)] and client.closed


async def test_the_client_closing_its_side_mid_body_ends_the_body_as_incomplete():
    edge = Edge()
    client = edge.connect()
    client.send(post("/v1/runs", b"{", length=10))
    await settle()
    assert client.eof() is True  # the writing side stays open for the answer
    await settle()
    assert edge.handler.body_errors == ["BodyIncomplete"] and client.answers()[0].status == 400


async def test_a_nearly_full_queue_takes_a_straddling_head_end_and_holds_what_follows():
    """The queue has room for two: a read completing a head begun before, one whole request and the start
    of a third fills it; the third waits unparsed, and nothing stops the connection."""
    edge = Edge()
    edge.handler.later = True
    client = edge.connect()
    client.send(get("/v1/runs/first"))
    await settle()
    client.send(b"".join(get(f"/v1/runs/q{i}") for i in range(MAX_PIPELINED - 2)))
    client.send(get("/v1/runs/straddle")[:-1])
    client.send(b"\n" + get("/v1/runs/whole") + b"GET /v1/runs/third HTTP/1.1\r\n")
    client.send(b"Host: gw\r\n\r\n")
    await settle()
    for _ in range(MAX_PIPELINED + 2):
        edge.handler.release(edge.handler.requests[-1])
        await settle()
    targets = [a.body.split(b" ")[1] for a in client.answers()]
    assert targets[-3:] == [b"/v1/runs/straddle", b"/v1/runs/whole", b"/v1/runs/third"], targets
    assert len(targets) == MAX_PIPELINED + 2 and not client.closed
