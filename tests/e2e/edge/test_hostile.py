"""Hostile clients: slow heads, slow bodies, idle connections, and a connection flood.

Each timeout is set to about a second so a test can watch it act; waits are
bounded generously (a few seconds) and never assert how fast anything was.
The flood runs the gateway as a child process with its file limit lowered to
1024, the way an attacker meets it in a default container.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import time

import pytest
import yaml

from proxy.dev import coordinator as devcoordinator
from tests.support.process import ServeProcess, free_port, serve_process
from tests.support.gateway import RUN_START
from tests.support.rawhttp import RawConnection, Response, request
from tests.support.recording import strict_upstream  # noqa: F401  (fixture)

RUN_START_BODY = json.dumps(RUN_START).encode()
JSON = ("Content-Type", "application/json")


async def closed_after_optional_408(conn: RawConnection, within: float) -> Response | None:
    """The gateway closes the connection within `within` s, possibly after a 408 envelope; returns that."""
    try:
        resp = await conn.response(timeout=within)
    except TimeoutError:
        raise AssertionError(f"connection still open after {within} s") from None
    if resp is not None:
        assert resp.status == 408 and resp.closes, resp.describe()
        assert await conn.closed_by_peer(2)
    return resp


# --------------------------------------------------------------------------- header timeout


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, limits={"header_timeout_s": 1}, listen={"keepalive_timeout_s": 60})
    async with await RawConnection.open(url) as conn:
        await closed_after_optional_408(conn, 6)


async def test_a_slowloris_head_is_cut_at_the_header_timeout_even_while_bytes_trickle(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, limits={"header_timeout_s": 1})
    async with await RawConnection.open(url) as conn:
        await conn.send(b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\n")
        answer = asyncio.ensure_future(closed_after_optional_408(conn, 12))
        trickle = b"X-Slow: " + b"a" * 100
        for i in range(len(trickle)):  # one byte per 0.1 s: ~10 s if never cut
            if answer.done():
                break
            try:
                await conn.send(trickle[i:i + 1])
            except ConnectionError:
                break
            await asyncio.sleep(0.1)  # a real slowloris: one byte per tenth of a second
        await answer  # raises if the connection outlived the trickle
        assert i < len(trickle) - 1, "the gateway let a head trickle in for 10 s against a 1 s header timeout"
    assert strict_upstream.requests == []


async def test_on_keep_alive_the_header_timeout_counts_from_the_next_requests_first_byte(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, limits={"header_timeout_s": 1}, listen={"keepalive_timeout_s": 30})
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/r1"))
        assert (await conn.response()).status == 200  # type: ignore[union-attr]
        await asyncio.sleep(2)  # idle longer than the header timeout: keep-alive governs this wait
        await conn.send(request("GET", "/v1/runs/r2"))
        resp = await conn.response()
        assert resp is not None and resp.status == 200, "an idle keep-alive connection was cut by the header timeout"
        await conn.send(b"GET /v1/runs/r3 HTTP/1.1\r\nHo")
        await closed_after_optional_408(conn, 6)
    assert [r.target for r in strict_upstream.requests] == [b"/v1/runs/r1", b"/v1/runs/r2"]


# --------------------------------------------------------------------------- body timeout


@pytest.mark.parametrize("target,head,part", [
    ("/v1/runs", [JSON, ("Content-Length", str(len(RUN_START_BODY)))], RUN_START_BODY[:20]),
    ("/v1/runs/r1:cancel", [JSON, ("Content-Length", "100")], b'{"reason": '),
    ("/v1/runs/r1:cancel", [JSON, ("Transfer-Encoding", "chunked")], b'5\r\n{"a":\r\n'),
], ids=["start run, length", "cancel, length", "cancel, chunked"])
async def test_a_body_that_stalls_gets_408_and_nothing_reaches_the_coordinator(gateway, strict_upstream, target,
                                                                               head, part):
    url = await gateway(strict_upstream.url, limits={"body_timeout_s": 1, "header_timeout_s": 30})
    async with await RawConnection.open(url) as conn:
        await conn.send(request("POST", target, head) + part)
        resp = await conn.response(method="POST", timeout=8)
        assert resp is not None and resp.status == 408, resp and resp.describe()
        error = resp.envelope()
        assert error is not None and error["code"] == "request_timeout", resp.describe()
        assert resp.closes and await conn.closed_by_peer(3)
    await asyncio.sleep(0.1)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == [] and strict_upstream.violations == []


async def test_a_slow_but_steady_body_within_the_body_timeout_is_forwarded(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, limits={"body_timeout_s": 5})
    async with await RawConnection.open(url) as conn:
        await conn.send(request("POST", "/v1/runs", [JSON, ("Content-Length", str(len(RUN_START_BODY)))]))
        for i in range(0, len(RUN_START_BODY), 40):
            await conn.send(RUN_START_BODY[i:i + 40])
            await asyncio.sleep(0.1)  # a slow but steady real client, within the body timeout
        resp = await conn.response(method="POST")
        assert resp is not None and resp.status == 200, resp and resp.describe()
    assert [r.body for r in strict_upstream.requests] == [RUN_START_BODY]


# --------------------------------------------------------------------------- keep-alive timeout


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, listen={"keepalive_timeout_s": 1}, limits={"header_timeout_s": 30})
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/r1"))
        resp = await conn.response()
        assert resp is not None and resp.status == 200 and not resp.closes
        assert await conn.closed_by_peer(6), "idle keep-alive connection still open"


# --------------------------------------------------------------------------- the connection cap


async def _still_open(conn: RawConnection) -> bool:
    return not await conn.closed_by_peer(0.3)


async def test_at_the_cap_idle_keep_alive_goes_first_then_silent_connections_oldest_first(gateway,
                                                                                         strict_upstream):
    url = await gateway(strict_upstream.url, listen={"max_connections": 4, "keepalive_timeout_s": 60},
                        limits={"header_timeout_s": 60})
    opened: list[RawConnection] = []
    try:
        async def connect(sends_request: bool) -> RawConnection:
            conn = await RawConnection.open(url)
            opened.append(conn)
            if sends_request:
                await conn.send(request("GET", "/v1/runs/r1"))
                resp = await conn.response()
                assert resp is not None and resp.status == 200
            await asyncio.sleep(0.05)  # admitted in this order
            return conn

        silent1 = await connect(False)
        idle1 = await connect(True)
        idle2 = await connect(True)
        silent2 = await connect(False)

        async def newcomer() -> None:
            async with await RawConnection.open(url) as conn:
                await conn.send(request("GET", "/v1/runs/new", [("Connection", "close")]))
                resp = await conn.response()
                assert resp is not None and resp.status == 200, "a new client was turned away at the cap"
            await asyncio.sleep(0.1)  # its slot is free again once the gateway saw the close

        await newcomer()
        assert [await _still_open(c) for c in (silent1, idle1, idle2, silent2)] == [True, False, True, True]
        silent3 = await connect(False)  # back at the cap: an idle keep-alive one is still reclaimed first
        await newcomer()
        assert [await _still_open(c) for c in (silent1, idle2, silent2, silent3)] == [True, False, True, True]
        silent4 = await connect(False)  # at the cap with only connections that never sent a request
        await newcomer()
        assert [await _still_open(c) for c in (silent1, silent2, silent3, silent4)] == [False, True, True, True]
    finally:
        for conn in opened:
            await conn.close()


# --------------------------------------------------------------------------- the connection flood



async def _attacker(url_host: str, port: int, pool: list[asyncio.StreamWriter], sends_request: bool) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(url_host, port), 5)
    except (OSError, TimeoutError):
        return
    pool.append(writer)
    if sends_request:
        writer.write(request("GET", "/v1/version"))  # answered, never read: an idle keep-alive connection


async def _well_behaved(host: str, port: int, path: str) -> bool:
    try:
        async with asyncio.timeout(8):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request("GET", path, [("Connection", "close")]))
                head = await reader.readuntil(b"\r\n\r\n")
                return head.startswith(b"HTTP/1.1 200 ")
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096,
                    reason="the test process itself needs ~1,300 descriptors")
async def test_a_connection_flood_does_not_stop_well_behaved_clients(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    coordinator, upstream = await devcoordinator.start(step_delay_s=0.01)
    ops_port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0, "event_loop": "asyncio"},
        "upstream": {"url": upstream},
        "auth": {"mode": "disabled"},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": ops_port},
        "logging": {"access_log": False},
        "drain_delay_s": 0, "shutdown_grace_s": 1,
    }))
    attackers: list[asyncio.StreamWriter] = []
    try:
        async with serve_process(config, file_limit=1024) as served:
            await _flood(served, ops_port, attackers)
    finally:
        for writer in attackers:
            writer.close()
        await coordinator.cleanup()


async def _flood(served: ServeProcess, ops_port: int, attackers: list[asyncio.StreamWriter]) -> None:
    """1,100 attacking connections against a gateway with 1,024 descriptors; well-behaved clients still served."""
    logs = served.logs
    host, port = served.address
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request("POST", "/v1/runs", [JSON, ("Connection", "close")], RUN_START_BODY))
        run = json.loads((await reader.read()).partition(b"\r\n\r\n")[2])
        writer.close()
    path = f"/v1/runs/{run['run_id']}"

    attack_started = time.monotonic()
    for batch in range(11):  # 1,100 connections, half idle after a request, half silent from the start
        await asyncio.gather(*(_attacker(host, int(port), attackers, sends_request=(batch + i) % 2 == 0)
                               for i in range(100)))
    await asyncio.sleep(0.5)  # the gateway process settles under the attack
    answered = 0
    for _ in range(5):  # 125 requests, 25 at a time, each on a fresh connection
        answered += sum(await asyncio.gather(*(_well_behaved(host, int(port), path) for _ in range(25))))
    attack_s = time.monotonic() - attack_started
    assert answered >= 119, f"only {answered} of 125 well-behaved requests were served during the flood"

    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", ops_port)
        writer.write(request("GET", "/metrics", [("Connection", "close")]))
        exposition = (await reader.read()).decode()
        writer.close()
    assert "# TYPE arp_gateway_connections_refused_total counter" in exposition
    assert all('reason="' in line for line in exposition.splitlines()
               if line.startswith("arp_gateway_connections_refused_total{"))
    gauge = re.search(r"^arp_gateway_connections_open(?:\{[^}]*\})? (\S+)$", exposition, re.M)
    assert gauge is not None and float(gauge.group(1)) < 1024, exposition[:3000]

    await asyncio.sleep(0.3)  # the child's warnings reach its log
    warnings = [(t, e) for t, e in logs if e.get("level") == "warning"
                and re.search(r"connection", json.dumps(e), re.I) and re.search(r"limit", json.dumps(e), re.I)]
    assert warnings, "no warning about the connection limit was logged"
    assert len(warnings) <= 1 + int(attack_s // 10), [e for _, e in warnings]
