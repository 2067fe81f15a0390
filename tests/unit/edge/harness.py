"""The edge without sockets or sleeping: a fake transport, a fake handler, time moved by hand.

In the manner of uvicorn's protocol tests: a `ClientConnection` is made by a
real `Listener` (cap, budget, sweep) and fed bytes through `data_received`;
what it writes, closes, aborts, pauses and resumes is recorded by the
transport. Time is a `FakeClock` (proxy/util/clock.py) given to the listener,
and the sweep is run by hand (`Edge.advance`). The event loop is the test's,
used only for futures and the tasks of answers that wait.

    edge = Edge(header_timeout_s=1)
    client = edge.connect()
    client.send(b"GET /v1/runs/r1 HTTP/1.1\r\nHost: a\r\n\r\n")
    (answer,) = client.answers()
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from proxy.arp.answers import Answer, error_answer
from proxy.edge.errors import BodyIncomplete, BodyTimeout, BodyTooLarge, ClientGone, Overloaded
from proxy.edge.listener import EdgeLimits, Listener
from proxy.edge.protocol import ClientConnection
from proxy.edge.request import Request
from proxy.util.clock import FakeClock

HIGH_WATER = 64 * 1024


class FakeTransport:
    """Records what the connection does to its socket; `stall()` and `flush()` play a client that stops
    and starts reading (the write buffer, pause_writing and resume_writing as asyncio would call them)."""

    def __init__(self, protocol: ClientConnection, loop: asyncio.AbstractEventLoop) -> None:
        self.protocol = protocol
        self.loop = loop
        self.written = bytearray()
        self.reading = True
        self.reading_calls: list[str] = []      # "pause" / "resume", in order
        self.closing = False
        self.aborted = False
        self.eof_written = False
        self.lost = False
        self.buffer = 0                          # bytes written that the client has not read
        self.stalled = False
        self.write_paused = False

    # -- what asyncio.Transport offers

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        if self.lost or self.aborted:
            return
        assert not self.eof_written, "write after write_eof"
        self.written += data
        if self.stalled:
            self.buffer += len(data)
            if not self.write_paused and self.buffer > HIGH_WATER:
                self.write_paused = True
                self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def pause_reading(self) -> None:
        self.reading = False
        self.reading_calls.append("pause")

    def resume_reading(self) -> None:
        self.reading = True
        self.reading_calls.append("resume")

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        # Like asyncio: the socket goes once what is buffered is sent, connection_lost in a later callback.
        self.closing = True
        if not self.buffer:
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.buffer = 0
        self.loop.call_soon(self._lose)

    # -- the client's side

    def stall(self) -> None:
        """The client stops reading: what is written from now on stays in the buffer."""
        self.stalled = True

    def flush(self) -> None:
        """The client reads everything."""
        self.stalled = False
        self.buffer = 0
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()
        if self.closing:
            self.loop.call_soon(self._lose)

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reason(self) -> str:
        return self.json()["error"]["details"]["reason"]


def parse_responses(data: bytes) -> list[Response]:
    """The whole answers in `data` (Content-Length or chunked; without either, the rest of the bytes)."""
    out: list[Response] = []
    i = 0
    while (end := data.find(b"\r\n\r\n", i)) >= 0:
        lines = data[i:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines[1:])}
        i = end + 4
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            if len(data) < i + size:
                break
            body, i = bytes(data[i:i + size]), i + size
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                line_end = data.index(b"\r\n", i)
                size = int(data[i:line_end], 16)
                i = line_end + 2
                if size == 0:
                    i += 2
                    break
                body += data[i:i + size]
                i += size + 2
        elif status == 100 or status in (204, 304):
            body = b""
        else:
            body, i = bytes(data[i:]), len(data)
        out.append(Response(status, headers, body))
    return out


class FakeHandler:
    """Stands in for the gateway. Answers each request with its method, target and body size, at once;
    with `later`, only when the test calls `release(request)` (from a task, like a stage that waits).
    A request with a body still arriving is read in a task first, as the gateway does."""

    def __init__(self) -> None:
        self.later = False
        self.fail = False
        self.requests: list[Request] = []
        self.body_errors: list[str] = []
        self.abandoned_: list[tuple[str, int]] = []
        self._gates: dict[int, asyncio.Future[None]] = {}

    def handle(self, request: Request) -> None:
        self.requests.append(request)
        if request.refusal is not None:
            request.respond(request.refusal)
            request.finish()
            return
        if self.fail:
            raise RuntimeError("the handler failed")
        if self.later or (request.has_body and not request.complete):
            request.spawn(self._answer_later(request))
            return
        self.answer(request, request.body_now())

    def answer(self, request: Request, body: bytes) -> None:
        text = b"%s %s %d" % (request.method.encode(), request.target, len(body))
        request.respond(Answer(200, text, content_type=b"text/plain"))
        request.finish()

    async def _answer_later(self, request: Request) -> None:
        try:
            body = await request.read_body()
        except (BodyTimeout, BodyTooLarge, BodyIncomplete, Overloaded) as exc:
            self.body_errors.append(type(exc).__name__)
            request.respond(error_answer(400, "invalid_request", type(exc).__name__, request_id=request.request_id))
            request.finish()
            return
        if self.later:
            gate = self._gates[id(request)] = asyncio.get_running_loop().create_future()
            await gate
        self.answer(request, body)

    def release(self, request: Request) -> None:
        self._gates.pop(id(request)).set_result(None)

    def abandoned(self, request: Request, status: int) -> None:
        self.abandoned_.append((request.request_id, status))


@dataclass
class Metrics:
    events: list[tuple[str, str]] = field(default_factory=list)
    overloads: list[str] = field(default_factory=list)

    def connection_event(self, family: str, reason: str) -> None:
        self.events.append((family, reason))

    def overloaded(self, waiting_for: str) -> None:
        self.overloads.append(waiting_for)


class Client:
    def __init__(self, conn: ClientConnection, transport: FakeTransport) -> None:
        self.conn = conn
        self.transport = transport

    def send(self, data: bytes) -> None:
        if not self.transport.lost:
            self.conn.data_received(data)

    def eof(self) -> bool:
        return self.conn.eof_received()

    def answers(self) -> list[Response]:
        return parse_responses(bytes(self.transport.written))

    @property
    def closed(self) -> bool:
        return self.transport.closing

    def leave(self) -> None:
        """The client's socket is gone (a reset)."""
        self.transport.lost = True
        self.conn.connection_lost(ConnectionResetError())


class Edge:
    def __init__(self, **limits: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = FakeClock()
        self.handler = FakeHandler()
        self.metrics = Metrics()
        self.limits = EdgeLimits(**limits)
        self.listener = Listener(self.handler, self.limits, self.metrics, clock=self.clock.monotonic)
        self.listener.bind(self.loop)

    def connect(self) -> Client:
        conn = self.listener.connection()
        transport = FakeTransport(conn, self.loop)
        conn.connection_made(transport)  # type: ignore[arg-type]
        return Client(conn, transport)

    def advance(self, seconds: float) -> None:
        """Moves time on, then runs one pass of the listener's deadline sweep."""
        self.clock.advance(seconds)
        self.listener.sweep.run(self.clock.monotonic())


async def settle(rounds: int = 5) -> None:
    """Lets the callbacks and tasks already due run (futures resolved, connection_lost delivered); no time passes."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def get(target: str = "/v1/runs/r1", *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", "Host: gw", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(target: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: gw", "Content-Type: application/json",
             f"Content-Length: {len(body) if length is None else length}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


__all__ = ["ClientGone", "Client", "Edge", "FakeTransport", "FakeHandler", "Response", "get", "post", "settle"]
