"""The accepting listener without a port (edge/listener.py): the connection cap and the budget's ceiling."""

from __future__ import annotations

import pytest

from tests.unit.edge.harness import Edge, get, settle

pytestmark = pytest.mark.asyncio


async def test_past_the_cap_the_oldest_idle_connection_is_reclaimed_for_a_new_one():
    edge = Edge(max_connections=2)
    older, newer = edge.connect(), edge.connect()
    older.send(get())
    newer.send(get())   # both idle now; the older one goes
    third = edge.connect()
    assert older.closed and not newer.closed and not third.closed
    assert ("connections_closed", "reclaimed") in edge.metrics.events
    await settle()
    assert set(edge.listener.connections) == {newer.conn, third.conn}


async def test_an_idle_connection_is_reclaimed_before_an_older_one_whose_head_is_arriving():
    edge = Edge(max_connections=2)
    arriving, idle = edge.connect(), edge.connect()
    arriving.send(b"GET /v1/runs/r1 HTTP/1.1\r\n")
    idle.send(get())
    edge.connect()
    assert idle.closed and not arriving.closed


async def test_past_the_cap_with_nothing_to_reclaim_a_new_connection_is_turned_away():
    edge = Edge(max_connections=1)
    edge.handler.later = True
    busy = edge.connect()
    busy.send(get())
    await settle()
    refused = edge.connect()
    assert refused.closed and not busy.closed
    assert edge.metrics.events == [("connections_refused", "max_connections")]


async def test_a_closed_connection_counts_against_the_cap_until_its_socket_is_gone():
    edge = Edge(max_connections=1)
    first = edge.connect()
    first.transport.stall()
    edge.handler.later = True
    first.send(get("/v1/runs/r1", "Connection: close"))
    await settle()
    first.conn.write(b"x" * 10)     # unsent bytes keep the socket open after close
    edge.handler.release(edge.handler.requests[0])
    await settle()
    assert first.conn.closed and not first.transport.lost
    second = edge.connect()
    assert second.closed, "a connection was accepted while a closing one still holds its socket"
    first.transport.flush()
    await settle()
    third = edge.connect()
    assert not third.closed


async def test_past_the_budgets_ceiling_a_new_connection_is_turned_away():
    edge = Edge(max_buffered_bytes=4096, header_timeout_s=100)
    filler = edge.connect()
    filler.send(b"GET /v1/runs/r1 HTTP/1.1\r\nX-Fill: " + b"a" * 5200)
    refused = edge.connect()
    assert refused.closed
    assert ("connections_refused", "buffer_budget") in edge.metrics.events


async def test_closing_the_listener_closes_idle_connections_and_lets_busy_ones_finish():
    edge = Edge()
    idle, busy = edge.connect(), edge.connect()
    idle.send(get())
    edge.handler.later = True
    busy.send(get())
    await settle()
    for conn in list(edge.listener.connections):
        conn.shut_down()
    assert idle.closed and not busy.closed
    edge.handler.release(edge.handler.requests[1])
    await settle()
    (answer,) = busy.answers()
    assert answer.headers[b"connection"] == b"close" and busy.closed
