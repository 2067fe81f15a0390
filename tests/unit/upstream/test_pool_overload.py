"""The coordinator pool under overload and after a restart it did not see.

Overload: with every connection busy a request waits at most `queue_timeout_s`,
then is shed (PoolBusy) without reaching the coordinator; waits and sheds are
counted. Restart: once a reused connection is reset before any answer, the
other idle connections (as old, so as dead) are dropped, so a GET's retries
land on fresh connections and succeed.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.dev import coordinator as devcoordinator
from proxy.upstream.pool import ConnectionReset, PoolBusy, UpstreamPool
from proxy.runtime.server import start_gateway
from tests.support.gateway import gateway_config
from tests.support.relay import HidingRelay
from tests.support.servers import RawServer

HEAD = b"GET /v1/runs/x HTTP/1.1\r\nHost: coordinator\r\n\r\n"


class Held:
    """A coordinator that answers only when told to, so connections stay busy on demand."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, writer: asyncio.StreamWriter) -> None:
        await self.release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()


@pytest.fixture
async def held():
    made: list[tuple[RawServer, UpstreamPool]] = []

    async def make(**options):
        answer = Held()
        server = RawServer(answer)
        url = await server.start()
        pool = UpstreamPool(url, connect_timeout_s=1, **{"max_connections": 1, **options})
        made.append((server, pool))
        return answer, server, pool

    yield make
    for server, pool in made:
        await pool.close()
        await server.close()


async def test_a_request_waits_at_most_queue_timeout_then_is_shed_unsent(held):
    answer, server, pool = await held(queue_timeout_s=0.2)
    first = asyncio.create_task(pool.request(HEAD, None))
    await asyncio.sleep(0.05)  # the first request holds the only connection by now
    with pytest.raises(PoolBusy) as caught:
        # Generous outer bound: the point is that it ends by itself, not how fast.
        async with asyncio.timeout(10):
            await pool.request(HEAD, None, deadline=asyncio.get_running_loop().time() + 30)
    assert caught.value.sent is False
    assert (pool.queued, pool.refused) == (1, 1)
    answer.release.set()
    response = await first
    response.release()
    assert len(server.requests) == 1          # the shed request never reached the coordinator
    assert pool.waiting == 0


async def test_a_waiter_gets_the_connection_freed_within_the_queue_timeout(held):
    answer, server, pool = await held(queue_timeout_s=5)
    first = asyncio.create_task(pool.request(HEAD, None))
    second = asyncio.create_task(pool.request(HEAD, None))
    await asyncio.sleep(0.05)  # both requests reached the pool: one holds, one queues
    assert pool.waiting == 1
    answer.release.set()
    for task in (first, second):
        response = await task
        assert (response.status, response.body_if_complete()) == (200, b"{}")
        response.release()
    assert (pool.queued, pool.refused) == (1, 0)
    assert server.connections == 1


async def test_a_request_deadline_shorter_than_the_queue_timeout_is_a_plain_timeout(held):
    _, _, pool = await held(queue_timeout_s=30)
    first = asyncio.create_task(pool.request(HEAD, None))
    await asyncio.sleep(0.05)  # the first request holds the only connection by now
    with pytest.raises(TimeoutError) as caught:
        await pool.request(HEAD, None, deadline=asyncio.get_running_loop().time() + 0.1)
    assert not isinstance(caught.value, PoolBusy)
    assert pool.refused == 0
    first.cancel()


async def test_a_connection_handed_to_a_cancelled_waiter_is_not_leaked(held):
    answer, _, pool = await held(queue_timeout_s=5)
    answer.release.set()
    holding = await pool.request(HEAD, None)
    waiting = asyncio.create_task(pool.request(HEAD, None))
    await asyncio.sleep(0.05)  # the second request reached the pool's queue
    assert pool.waiting == 1
    # The connection goes to the waiter and the waiter is cancelled in the same loop turn.
    holding.body_if_complete()
    holding.release()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The one connection of the pool is still usable: without the fix this waited forever.
    async with asyncio.timeout(5):
        response = await pool.request(HEAD, None)
    assert response.status == 200
    response.release()
    assert pool.size == 1


async def test_stale_idle_connections_are_dropped_after_the_first_reset():
    """Pool level: the first reused connection that resets takes the other idle ones with it."""
    runner, url = await devcoordinator.start(step_delay_s=0.01)
    port = int(url.rsplit(":", 1)[1])
    relay = HidingRelay(port)
    pool = UpstreamPool(await relay.start(), max_connections=8, connect_timeout_s=1)
    head = b"GET /v1/health HTTP/1.1\r\nHost: c\r\n\r\n"
    try:
        responses = await asyncio.gather(*(pool.request(head, None) for _ in range(8)))
        for r in responses:
            r.body_if_complete()
            r.release()
        assert pool.size == 8 and relay.connections == 8
        await runner.cleanup()
        runner, _ = await devcoordinator.start(port=port, step_delay_s=0.01)
        with pytest.raises(ConnectionReset):
            await pool.request(head, None)
        assert pool.dropped_stale == 7
        response = await pool.request(head, None)
        assert response.status == 200 and relay.connections == 9
        response.release()
    finally:
        await pool.close()
        await relay.close()
        await runner.cleanup()


async def test_gets_after_an_unseen_coordinator_restart_all_succeed(http):
    """The issue's measurement: 8 pooled connections, the coordinator restarts on the same port
    without the gateway seeing it, then GETs. Before the fix two of them failed with 502, their
    retries spent on the other stale connections."""
    runner, url = await devcoordinator.start(step_delay_s=0.01)
    port = int(url.rsplit(":", 1)[1])
    relay = HidingRelay(port)
    server, gateway = await start_gateway(gateway_config(await relay.start()))
    try:
        async def get(run_id: str) -> tuple[int, dict]:
            async with http.get(f"{gateway}/v1/runs/{run_id}") as resp:
                return resp.status, await resp.json()

        # Eight GETs at once: eight pooled connections.
        results = await asyncio.gather(*(get(f"missing-{i}") for i in range(8)))
        assert all(status == 404 for status, _ in results)
        assert relay.connections == 8
        await runner.cleanup()
        runner, _ = await devcoordinator.start(port=port, step_delay_s=0.01)
        async with http.post(f"http://127.0.0.1:{port}/v1/runs",
                             json={"root_node_type_ref": {"node_type_id": "a", "version": "1"},
                                   "input": {}}) as resp:
            run_id = (await resp.json())["run_id"]
        statuses = []
        for _ in range(8):
            status, body = await get(run_id)
            statuses.append(status)
            if status == 200:
                assert body["run_id"] == run_id
        assert statuses == [200] * 8, statuses
        assert relay.resets >= 1   # the restart really was unseen: a stale connection was hit
    finally:
        await server.cleanup()
        await relay.close()
        await runner.cleanup()
