"""A strict recording coordinator: parses what the gateway sends with h11, not with the gateway's parser.

The gateway parses with llhttp (httptools); a framing bug that llhttp and the
gateway agree on would be invisible to an upstream built on the same parser.
h11 is an independent, strict implementation: every request it completes is
recorded with its raw header names, and anything it refuses (or bytes left
over at a close, or left sitting after a complete request) is recorded as a
violation, which edge tests assert never happens.

    upstream = StrictUpstream()
    url = await upstream.start()
    ...
    assert upstream.violations == []
    assert [r.target for r in upstream.requests] == [b"/v1/runs/r1"]
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import h11
import pytest

# Answers carry this header so a client can tell a relayed answer from one the gateway made.
SEQ_HEADER = "X-Upstream-Seq"
# A request may ask for its answer's status (so relayed 4xx answers are exercised too).
WANT_STATUS = "x-want-status"


@dataclass
class Recorded:
    seq: int
    connection: int
    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]  # names as sent (h11 keeps the original case)
    body: bytes

    def all(self, name: str) -> list[bytes]:
        low = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == low]

    def one(self, name: str) -> bytes | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times upstream: {values}"
        return values[0] if values else None

    def folded_names(self) -> list[bytes]:
        """Header names as a lenient origin server might read them: case and `_`/`-` folded."""
        return [n.lower().replace(b"_", b"-") for n, _ in self.headers]


Answer = Callable[[Recorded], tuple[int, list[tuple[str, str]], bytes]]


def default_answer(req: Recorded) -> tuple[int, list[tuple[str, str]], bytes]:
    status = 200
    want = req.one(WANT_STATUS)
    if want is not None and want.isdigit():
        status = int(want)
    return status, [("Content-Type", "application/json")], json.dumps({"seq": req.seq}).encode()


class StrictUpstream:
    def __init__(self, answer: Answer = default_answer) -> None:
        self.answer = answer
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.connections = 0
        self.url = ""
        self._open: list[_Conn] = []
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def leftovers(self) -> list[str]:
        """Bytes sitting unparsed on an open connection after its last complete request:
        the gateway sent more than the requests it meant to (a smuggled or torn request)."""
        return [f"connection {c.number}: {c.conn.trailing_data[0][:300]!r}"
                for c in self._open if c.conn.their_state is h11.IDLE and c.conn.trailing_data[0]]

    async def drop_dirty(self) -> None:
        """Closes connections holding unparsed bytes, so one bad exchange cannot spoil later ones."""
        for conn in list(self._open):
            if conn.conn.trailing_data[0] or conn.conn.their_state not in (h11.IDLE, h11.DONE):
                conn.transport.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._open):
                conn.transport.close()
            await self._server.wait_closed()


class _Conn(asyncio.Protocol):
    def __init__(self, owner: StrictUpstream) -> None:
        self.owner = owner
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        self.number = 0
        self.transport: asyncio.Transport
        self._head: h11.Request | None = None
        self._body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        self.number = self.owner.connections
        self.owner._open.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.owner._open:
            self.owner._open.remove(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._violation(f"connection closed with unparsed bytes {self.conn.trailing_data[0][:300]!r}")
        elif self.conn.their_state not in (h11.IDLE, h11.DONE, h11.CLOSED, h11.MUST_CLOSE):
            self._violation(f"connection closed inside a request ({self.conn.their_state.__name__})")
        return False

    def _violation(self, what: str) -> None:
        self.owner.violations.append(f"connection {self.number}: {what}")

    def _process(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._violation(f"h11 refused the request: {exc} (buffered {self.conn.trailing_data[0][:300]!r})")
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._head = event
                self._body = bytearray()
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._complete()
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    self.transport.close()
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    self.transport.close()
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _complete(self) -> None:
        head = self._head
        assert head is not None
        owner = self.owner
        req = Recorded(len(owner.requests) + 1, self.number, head.method, head.target, head.http_version,
                       list(head.headers.raw_items()), bytes(self._body))
        owner.requests.append(req)
        status, headers, body = owner.answer(req)
        out = self.conn.send(h11.Response(status_code=status, headers=[
            *headers, ("Content-Length", str(len(body))), (SEQ_HEADER, str(req.seq))]))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        self.transport.write(out)


@pytest.fixture
async def strict_upstream() -> AsyncIterator[StrictUpstream]:
    """A started StrictUpstream (its url in `.url`); import this fixture into a test module to use it."""
    upstream = StrictUpstream()
    upstream.url = await upstream.start()
    yield upstream
    await upstream.close()
