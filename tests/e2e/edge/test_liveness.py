"""Liveness: every timeout stays enforced, whatever one pass of a periodic loop runs into.

The deadline sweeps (listener and coordinator pool), the JWKS refresh loop and
the access-log flush each meet one failing iteration here, and the next
deadline, refresh or flush must still happen. Gateways and coordinators are
real sockets on loopback with small timeouts.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import time
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.observability.accesslog import FLUSH_LINES, AccessLog
from proxy.auth.jwks_fetch import FetchErrorKind
from proxy.util.clock import FakeClock
from proxy.edge.protocol import ClientConnection
from proxy.runtime.server import start_gateway
from proxy.upstream.pool import UpstreamPool, _Connection
from tests.support.jwks import ScriptedFetcher, UpperBound, scheduler
from tests.support.gateway import RUN_START, gateway_config
from tests.support.rawhttp import RawConnection, Response, request
from tests.support.recording import strict_upstream  # noqa: F401  (fixture)
from tests.support.process import free_port, serve_process

RUN_START_BODY = json.dumps(RUN_START).encode()
JSON = ("Content-Type", "application/json")


class FirstAnswerThenSilent:
    """A coordinator that answers the first request on each connection, then never again (it keeps
    reading, so the connection stays open until the gateway gives up on it)."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0
        self._handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            body = b'{"run_id":"r1","state":"running"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            while await reader.read(65536):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.pop(task, None)
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._handlers.values():
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()


async def _ask(url: str, data: bytes, limit_s: float) -> tuple[Response | None, float]:
    """One request on a fresh connection: the answer and how long it took, None if none came in `limit_s`."""
    started = time.monotonic()
    async with await RawConnection.open(url) as conn:
        await conn.send(data)
        try:
            resp = await asyncio.wait_for(conn.response(), limit_s)
        except asyncio.TimeoutError:
            resp = None
    return resp, time.monotonic() - started


def _mix(n: int) -> list[bytes]:
    kinds = [request("GET", "/v1/runs/r1"),
             request("POST", "/v1/runs", [JSON], RUN_START_BODY),
             request("GET", "/v1/runs/r1/events")]
    return [kinds[i % 3] for i in range(n)]


async def test_reused_connections_that_go_silent_all_time_out_with_504(gateway):
    coordinator = FirstAnswerThenSilent()
    upstream_url = await coordinator.start()
    timeout = 1.0
    url = await gateway(upstream_url, upstream={"request_timeout_s": timeout, "max_connections": 12})
    try:
        for _ in range(3):
            # Six coordinator connections that each answered once, now idle in the pool...
            warm = await asyncio.gather(*(_ask(url, data, 5) for data in _mix(6)))
            assert all(resp is not None and resp.status in (200, 201) for resp, _ in warm), warm
            # ...are reused at once by six requests, and go silent: each must time out on its own.
            answers = await asyncio.gather(*(_ask(url, data, timeout + 3) for data in _mix(6)))
            for resp, took in answers:
                assert resp is not None, "a request to a silent coordinator hung past its timeout"
                assert resp.status == 504 and resp.envelope()["code"] == "run_coordinator_timeout"
                assert took < timeout + 2
    finally:
        await coordinator.close()


# --------------------------------------------------------------------------- one failing sweep pass


async def test_a_failing_expiry_in_the_listener_sweep_leaves_later_deadlines_enforced(gateway, monkeypatch, caplog):
    real = ClientConnection.expire
    raised = []

    def expire_once_failing(self: ClientConnection) -> None:
        if not raised:
            raised.append(self)
            raise RuntimeError("injected")
        real(self)

    monkeypatch.setattr(ClientConnection, "expire", expire_once_failing)
    url = await gateway(None, limits={"header_timeout_s": 0.3})
    with caplog.at_level(logging.ERROR, logger="proxy.edge.sweep"):
        async with await RawConnection.open(url) as first:
            await first.send(b"GET /v1/runs/r1 HTTP/1.1\r\n")  # a head that never ends
            await asyncio.sleep(0.6)   # its deadline passed and its expiry raised
            assert raised
            async with await RawConnection.open(url) as second:
                await second.send(b"GET /v1/runs/r1 HTTP/1.1\r\n")
                assert await asyncio.wait_for(second.closed_by_peer(), 3), "the sweep stopped after one failure"
            assert await asyncio.wait_for(first.closed_by_peer(), 3)
    failures = [r for r in caplog.records if r.name == "proxy.edge.sweep"]
    assert len(failures) == 1 and "injected" in (failures[0].exc_text or "")


async def test_a_failing_expiry_in_the_pool_sweep_leaves_later_deadlines_enforced(monkeypatch):
    silent = FirstAnswerThenSilent()
    url = await silent.start()
    real = _Connection.expire
    raised = []

    def expire_once_failing(self: _Connection) -> None:
        if not raised:
            raised.append(self)
            raise RuntimeError("injected")
        real(self)

    monkeypatch.setattr(_Connection, "expire", expire_once_failing)
    pool = UpstreamPool(url, max_connections=2, connect_timeout_s=1, sweep_interval_s=0.05)
    loop = asyncio.get_running_loop()
    head = b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n"
    try:
        # Two connections that each answered once: every later request on them goes unanswered.
        warm = await asyncio.gather(*(pool.request(head, None, deadline=loop.time() + 1) for _ in range(2)))
        for response in warm:
            response.release()
        first = asyncio.create_task(pool.request(head, None, deadline=loop.time() + 0.2))
        await asyncio.sleep(0.4)  # past the request's real deadline
        assert raised
        second = asyncio.create_task(pool.request(head, None, deadline=loop.time() + 0.2))
        # Bounded by asyncio.wait, whose own timeout raises nothing: only the pool's TimeoutError counts.
        done, pending = await asyncio.wait({first, second}, timeout=3)
        for task in pending:
            task.cancel()
        assert not pending, "the sweep stopped after one failure: a deadline was never enforced"
        assert all(isinstance(task.exception(), TimeoutError) for task in done)
    finally:
        await pool.close()
        await silent.close()


# --------------------------------------------------------------------------- the other periodic loops


async def test_a_failing_jwks_refresh_iteration_does_not_end_the_loop(caplog, clock: FakeClock) -> None:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        clock.advance(delay)
        if len(sleeps) == 4:
            raise asyncio.CancelledError

    s = scheduler(clock, ScriptedFetcher(["k1"], FetchErrorKind.TIMEOUT, ["k2"]), sleep=sleep, rng=UpperBound())
    real = s.keys.set_keys
    calls = []

    def set_keys_once_failing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        real(*args, **kwargs)

    s.keys.set_keys = set_keys_once_failing  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="proxy.jwks"), pytest.raises(asyncio.CancelledError):
        await s.run()
    # The first iteration failed while installing; the loop backed off, retried, and recovered.
    assert s.keys.ready and s.keys.find_key("k2") is not None
    assert sleeps[1] == 1 and sleeps[2] == 2      # backed off after each failure instead of spinning
    assert len([r for r in caplog.records if "iteration failed" in r.getMessage()]) == 1


async def test_a_failing_access_log_flush_neither_fails_the_request_nor_stops_later_flushes() -> None:
    class Flaky(io.StringIO):
        fails = 1

        def write(self, text: str) -> int:
            if self.fails:
                self.fails -= 1
                raise RuntimeError("injected")
            return super().write(text)

    out = Flaky()
    access = AccessLog(out, log_subject=False)

    def record(n: int) -> None:
        access.record(request_id=f"r{n}", method="GET", route="/v1/runs/{run_id}", status=200, seconds=0.001,
                      upstream_s=None, bytes_in=0, bytes_out=2, auth_result="allowed", auth_reason="",
                      subject=None, client="127.0.0.1", user_agent=None, issuer=None, run_id=None)

    for n in range(FLUSH_LINES):  # the last one fills the batch and flushes inline, into the failing write
        record(n)
    record(FLUSH_LINES)
    await asyncio.sleep(0.4)     # the timed flush of the next batch: a real loop timer (call_later)
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f"r{FLUSH_LINES}"]


# --------------------------------------------------------------------------- clients that stop reading


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _non_reader(url: str, data: bytes, *, repeat: int, limit_s: float = 4.0) -> socket.socket:
    """A client with a small receive buffer that writes `data` up to `repeat` times, never reading,
    until the gateway stops taking its bytes (or `limit_s` passes)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, _address(url))
    ends = time.monotonic() + limit_s
    pending, sent, stalled = b"", 0, 0
    while time.monotonic() < ends and stalled < 10:
        if not pending:
            if sent == repeat:
                break
            pending, sent = data, sent + 1
        try:
            pending = pending[sock.send(pending):]
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await asyncio.sleep(0.05)  # the peer's real receive buffer is full
        except OSError:
            break  # the gateway already gave up on it
    return sock


async def _served(url: str, path: str, limit_s: float) -> Response | None:
    """Retries a request on fresh connections until one is answered, for at most `limit_s`."""
    ends = time.monotonic() + limit_s
    while time.monotonic() < ends:
        try:
            async with asyncio.timeout(max(0.1, ends - time.monotonic())):
                async with await RawConnection.open(url) as conn:
                    await conn.send(request("GET", path))
                    resp = await conn.response()
                    if resp is not None:
                        return resp
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)  # polls a real server
    return None


async def test_clients_that_never_read_their_answers_lose_their_slots_after_the_send_timeout(gateway):
    url = await gateway(None, listen={"max_connections": 4}, limits={"send_timeout_s": 0.5})
    # Requests pipelined until the unread answers fill every buffer and the gateway stops taking more.
    hogs = await asyncio.gather(*(_non_reader(url, request("GET", "/nothing-here") * 32, repeat=5000)
                                  for _ in range(4)))
    try:
        resp = await _served(url, "/nothing-here", 6)
        assert resp is not None, "clients that never read held every connection slot"
        assert resp.status == 404
    finally:
        for sock in hogs:
            sock.close()


async def test_a_client_that_never_reads_a_large_answer_frees_the_coordinator_connection(gateway, upstream):
    gone = asyncio.Event()

    async def large(req: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(req)
        try:
            for _ in range(128):  # 8 MiB
                await response.write(b" " * 65536)
        except BaseException:
            gone.set()
            raise
        return response

    upstream.route("GET", "/v1/runs/large", large)
    upstream.route("GET", "/v1/runs/small", lambda req: _json({"run_id": "small"}))
    url = await gateway(await upstream.start(), limits={"send_timeout_s": 0.5},
                        upstream={"max_connections": 1, "queue_timeout_s": 0.2})
    hog = await _non_reader(url, request("GET", "/v1/runs/large"), repeat=1, limit_s=1)
    try:
        await asyncio.wait_for(gone.wait(), 6)   # the coordinator's connection was closed under it
        resp = await _served(url, "/v1/runs/small", 4)
        assert resp is not None and resp.status == 200, resp and resp.describe()
        # The non-reader's connection was cut: what it reads now ends short of the 8 MiB.
        received = await asyncio.wait_for(_read_all(hog), 5)
        assert received < 8 * 1024 * 1024
    finally:
        hog.close()


async def _read_all(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    total = 0
    try:
        while chunk := await loop.sock_recv(sock, 1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


async def _json(body: Any) -> web.Response:
    return web.json_response(body)


# --------------------------------------------------------------------------- edge framing (RFC 9112)


async def test_twenty_pipelined_requests_in_one_write_are_all_answered_in_order(gateway):
    url = await gateway(None)
    async with await RawConnection.open(url) as conn:
        await conn.send(b"".join(request("GET", f"/nothing/{i}", [("X-Request-ID", f"pipe-{i}")])
                                 for i in range(20)))
        ids = []
        for _ in range(20):
            resp = await conn.response()
            assert resp is not None, f"the connection closed after {len(ids)} answers"
            ids.append(resp.request_id)
    assert ids == [f"pipe-{i}" for i in range(20)]


async def test_a_closed_connection_with_unsent_answers_counts_until_its_socket_is_gone():
    server, url = await start_gateway(gateway_config(None, limits={"send_timeout_s": 0.6},
                                                     logging={"access_log": False}))
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, _address(url))
        await asyncio.sleep(0.05)  # the gateway has accepted the real connection
        (conn,) = server.listener.connections
        # The gateway's side of this one socket buffers little, so unread answers stay in the transport.
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        answers = 151
        pipeline_parts = [request("GET", "/nothing-here")] * (answers - 1) + [
            request("GET", "/nothing-here", [("Connection", "close")])]
        for start in range(0, answers, 10):  # a few at a time, never deeper than the pipelining queue
            await loop.sock_sendall(sock, b"".join(pipeline_parts[start:start + 10]))
            await asyncio.sleep(0.01)  # the gateway reads between batches
        await asyncio.sleep(0.2)  # the answers fill the real socket buffers
        assert conn.closed and conn.transport.get_write_buffer_size() > 0, \
            "the answers drained: the case under test did not arise"
        # Closed, but its socket is open while its bytes wait: it still counts against the cap.
        assert list(server.listener.connections) == [conn]
        async with asyncio.timeout(3):
            while server.listener.connections:
                await asyncio.sleep(0.05)  # polls until the real socket is freed
        received = await asyncio.wait_for(_read_all(sock), 3)   # the socket was freed: the client sees its end
        assert received < answers * 167, "the unsent answers were not dropped"
        sock.close()
    finally:
        await server.cleanup()


# --------------------------------------------------------------------------- descriptor exhaustion under uvloop



async def test_descriptor_exhaustion_under_uvloop_is_counted_and_logged(tmp_path):
    ops_port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0, "event_loop": "uvloop", "max_connections": 1000},
        "upstream": {"url": None},
        "auth": {"mode": "disabled"},
        "limits": {"header_timeout_s": 30, "send_timeout_s": 0.4},   # sweeps every 0.1 s
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": ops_port},
        "logging": {"access_log": False},
        "drain_delay_s": 0, "shutdown_grace_s": 1,
    }))
    clients: list[asyncio.StreamWriter] = []
    try:
        async with serve_process(config, file_limit=128) as served:
            host, port = served.address
            logs = served.logs
            for _ in range(160):  # more than the gateway has descriptors for
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
                except (OSError, TimeoutError):
                    continue
                clients.append(writer)
            async with asyncio.timeout(5):
                while not any(e.get("event") == "connection_limit" and e.get("action") == "fd_limit" for _, e in logs):
                    await asyncio.sleep(0.05)  # the child's log line arrives
            for writer in clients:
                writer.close()
            clients.clear()
            exposition = ""
            async with asyncio.timeout(10):  # the descriptors come back once the gateway sees the clients leave
                while 'reason="fd_limit"' not in exposition:
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", ops_port)
                        writer.write(request("GET", "/metrics", [("Connection", "close")]))
                        exposition = (await reader.read()).decode()
                        writer.close()
                    except OSError:
                        await asyncio.sleep(0.1)  # polls a child process's ops port
            found = re.search(r'^arp_gateway_connections_refused_total\{reason="fd_limit"\} (\S+)$', exposition, re.M)
            assert found is not None and float(found.group(1)) >= 1, exposition[:2000]
    finally:
        for writer in clients:
            writer.close()


async def _one(url: str, data: bytes) -> tuple[Response | None, bool]:
    """Sends `data` on a fresh connection: the first answer, and whether the gateway then closed."""
    async with await RawConnection.open(url) as conn:
        await conn.send(data)
        resp = await conn.response()
        closed = resp is None or resp.closes and await conn.closed_by_peer()
        return resp, closed


NEXT = b"GET /v1/runs/r2 HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_http10_with_transfer_encoding_is_400_and_closes_without_forwarding_what_follows(
        gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    resp, closed = await _one(url, b"POST /v1/runs/r1:cancel HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n"
                                   b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"2\r\n{}\r\n0\r\n\r\n" + NEXT)
    assert resp is not None and resp.status == 400, resp and resp.describe()
    error = resp.envelope()
    assert error is not None and error["details"]["reason"] == "bad_framing"
    assert closed
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == []


async def test_a_request_with_upgrade_and_a_body_is_400_and_nothing_is_forwarded(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    resp, closed = await _one(url, b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                                   b"Upgrade: websocket\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 16\r\n\r\n" + b'{"reason": "up"}' + NEXT)
    assert resp is not None and resp.status == 400, resp and resp.describe()
    error = resp.envelope()
    assert error is not None and error["details"]["reason"] == "upgrade_with_body"
    assert closed
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == []


@pytest.mark.parametrize("target,forwarded", [
    (b"http://gateway.test/v1/runs/r1", b"/v1/runs/r1"),
    (b"HTTP://Gateway.Test/v1/runs/r1?a=b", b"/v1/runs/r1?a=b"),
    (b"http://gateway.test:8080/v1/runs/r1/events", b"/v1/runs/r1/events"),
])
async def test_absolute_form_targets_are_routed_on_their_path(gateway, strict_upstream, target, forwarded):
    url = await gateway(strict_upstream.url)
    host = target.split(b"/")[2].decode()
    resp, _ = await _one(url, request("GET", target, [("Host", host)]))
    assert resp is not None and resp.status == 200, resp and resp.describe()
    (rec,) = strict_upstream.requests
    assert rec.target == forwarded


async def test_an_absolute_form_target_whose_authority_is_not_the_host_is_400(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    resp, _ = await _one(url, request("GET", b"http://elsewhere.test/v1/runs/r1", [("Host", "gateway.test")]))
    assert resp is not None and resp.status == 400
    error = resp.envelope()
    assert error is not None and error["details"]["reason"] == "invalid_host"
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == []


async def test_a_client_still_sending_a_huge_body_reads_its_413_once_it_is_done(gateway, strict_upstream):
    """Like most simple clients, it writes the whole request, then reads. The 413 comes long before the body
    ends; closing then resets the connection under the upload, and such a client reports the reset
    instead of the answer. The gateway drains (lingers) instead, for a bounded time."""
    url = await gateway(strict_upstream.url)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, _address(url))
    size = 16 * 1024 * 1024
    chunk = b" " * 65536
    try:
        await loop.sock_sendall(sock, b"POST /v1/runs HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n" % size)
        try:
            async with asyncio.timeout(4):
                for _ in range(size // len(chunk)):
                    await loop.sock_sendall(sock, chunk)
        except OSError as exc:
            pytest.fail(f"the upload was cut ({exc!r}): a client that reads after writing never sees its 413")
        received = b""
        try:
            async with asyncio.timeout(5):
                while b"\r\n\r\n" not in received and (data := await loop.sock_recv(sock, 65536)):
                    received += data
        except ConnectionResetError:
            pytest.fail(f"the connection was reset before the answer was read: {received!r}")
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert strict_upstream.requests == []
