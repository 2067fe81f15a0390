"""The public listener: one asyncio Protocol per client connection, parsed by llhttp (httptools).

Everything the edge decides about bytes happens here, before any gateway
stage sees a request:
- framing: llhttp parses in its strict mode and bodies are buffered whole (up
  to `limits.max_body_bytes`), so whatever reaches the coordinator is framed by
  the gateway alone; nothing is ever decompressed;
- the target: origin-form, RFC 3986 characters only (absolute-form is routed on its path);
- the head's size and line count (llhttp has no limit of its own), and the
  header, body and keep-alive timeouts, kept by one periodic sweep per
  listener rather than a timer per request;
- the connection cap: idle connections are reclaimed, oldest first, before a
  new client is turned away;
- memory: every head and body byte held counts against one process-wide budget
  (`limits.max_buffered_bytes`); while it is full no connection reads, and a
  head or body still starved of it when its timeout passes gets 503 `overloaded`;
- order: pipelined requests are answered strictly one after another;
- clients that stop reading: unsent answer bytes get `limits.send_timeout_s` to drain, then the
  connection is aborted; a connection counts against the cap until its socket is gone.

A request refused here still reaches the gateway, carrying its `refusal`, so
it gets an ErrorEnvelope, an access-log line and a count like any other.

    listener = Listener(gateway, limits, metrics)
    url = await listener.start("127.0.0.1", 8080)
    ...
    await listener.close(grace_s=25)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import resource
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from enum import IntEnum
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Protocol

import httptools

from ..arp.answers import Answer, error_answer
from .sweep import DeadlineSweep

log = logging.getLogger("proxy.edge.listener")

# Sockets the process needs besides client connections: the coordinator pool is added on top.
FD_HEADROOM = 64
# Pipelined requests parsed ahead of the one being answered; past it the rest of the read is held
# unparsed and reading pauses until the queue has room again.
MAX_PIPELINED = 16
# A request head ends in two line feeds (an optional CR between them), or in one at the start of a
# read when the head's end straddles two reads: counting these bounds the requests a read can queue.
_HEAD_END = re.compile(rb"\n\r?\n|^\r?\n")
LIMIT_LOG_INTERVAL_S = 10.0
# What one connection is assumed to need at least: the budget admits no more connections than
# could each hold a small head in it.
CONNECTION_BYTES = 4096
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# RFC 3986 origin-form: "/" path characters (unreserved, sub-delims, ":", "@", "/", "%") and a
# query that may also hold "?". Removing these must leave nothing.
_TARGET_CHARS = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                 b"-._~!$&'()*+,;=:@/%?")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# A well-formed request line: an unknown method in it is 501, anything else the parser refuses is 400.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")
_HOST_CHARS = _TARGET_CHARS.replace(b"/", b"").replace(b"?", b"") + b"[]"
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_IDS = random.Random()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# RFC 9112 9.6: closing while the client still sends would reset the connection and could destroy the
# answer before the client reads it. So such a connection is half-closed and drained, for this long at most.
LINGER_S = 5.0
# RFC 9112 3.2.2 absolute-form: scheme "://" authority, then the path and query.
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?]*)(.*)", re.S)


class Phase(IntEnum):
    IDLE = 0    # kept alive between requests
    HEAD = 1    # a request head is arriving
    BODY = 2    # the gateway waits for a request body
    BUSY = 3    # a request is being answered
    LINGER = 4  # answered and half-closed: what the client still sends is read and dropped


class ClientGone(Exception):
    """The client closed its connection."""


class BodyTooLarge(Exception):
    """The body grew past limits.max_body_bytes."""


class BodyTimeout(Exception):
    """The body did not arrive within limits.body_timeout_s."""


class BodyIncomplete(Exception):
    """The body ended before its end: the client closed its side (`incomplete_body`), or its framing
    broke (`bad_framing`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrailerTooLarge(BodyIncomplete):
    """The chunked body's trailer section grew past limits.max_header_bytes or max_headers."""

    def __init__(self) -> None:
        super().__init__("trailer_too_large")


class Overloaded(Exception):
    """limits.max_buffered_bytes stayed full until limits.body_timeout_s passed: the body could not be read."""


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing with this answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = 1024 * 1024
    max_connections: int = 1024
    max_buffered_bytes: int = 64 * 1024 * 1024
    send_timeout_s: float = 60.0

    @property
    def sweep_interval_s(self) -> float:
        """Timeouts are enforced to within a quarter of the shortest one (and a second at most)."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.keepalive_timeout_s, self.send_timeout_s)
        return max(0.01, min(1.0, shortest / 4))


def default_max_connections(upstream_connections: int, max_buffered_bytes: int | None = None) -> int:
    """Client connections that fit under the open-file limit beside the coordinator pool and
    the control plane, so accept() never meets EMFILE from client sockets alone; and, given the
    memory budget, no more than it could give a small head each (pods often allow a million files)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    by_files = soft - upstream_connections - FD_HEADROOM
    if max_buffered_bytes is not None:
        by_files = min(by_files, max_buffered_bytes // CONNECTION_BYTES)
    return max(1, by_files)


class Budget:
    """limits.max_buffered_bytes: the head and body bytes held by all connections together.

    A body of known length is reserved whole before it is read, first come first served: were bodies
    charged as they arrive, a crowd of uploads would share the budget out in fragments and none would
    finish. Heads and chunked bodies are charged as they arrive. Full at the limit; room again only
    below three quarters of it, so that a budget hovering at the edge does not pause and resume every
    connection once per request."""

    __slots__ = ("limit", "used", "full", "ceiling", "_low", "on_full", "on_room", "waiting")

    def __init__(self, limit: int, on_full: Callable[[], None], on_room: Callable[[], None]) -> None:
        self.limit = limit
        self.used = 0
        self.full = False
        self.ceiling = limit + limit // 4  # new connections are turned away past it (see Listener.admit)
        self._low = limit * 3 // 4
        self.on_full = on_full
        self.on_room = on_room
        self.waiting: dict[ClientConnection, None] = {}  # bodies waiting for a reservation, oldest first

    def take(self, size: int) -> None:
        self.used += size
        if self.used >= self.limit and not self.full:
            self.full = True
            self.on_full()

    def give(self, size: int) -> None:
        self.used -= size
        if self.waiting:
            self._admit()
        if self.full and self.used <= self._low:
            self.full = False
            self.on_room()

    def reserve(self, conn: ClientConnection, size: int) -> bool:
        """Takes `size` for a body now if it fits and nobody waits before it; else queues `conn`."""
        if not self.waiting and self.used + size <= self.limit:
            self.take(size)
            return True
        self.waiting[conn] = None
        return False

    def forget(self, conn: ClientConnection) -> None:
        self.waiting.pop(conn, None)

    def _admit(self) -> None:
        waiting = self.waiting
        while waiting:
            conn = next(iter(waiting))
            need = conn.room_needed()
            if need > 0 and self.used + need > self.limit:
                return
            del waiting[conn]
            if need > 0:
                self.take(need)
            conn.admitted(need)


@lru_cache(maxsize=1)
def http_date(second: int) -> bytes:
    """An RFC 9110 Date header line for this second: formatted once, whatever the request rate."""
    return b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"


@lru_cache(maxsize=128)
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def new_request_id(given: bytes | None) -> str:
    # A client-chosen id is kept for correlation, but only if it is safe to log and echo.
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    # Correlation ids need uniqueness, not secrecy: no urandom syscall per request. A generator of
    # our own, seeded from the OS once: whoever calls random.seed() cannot make ids repeat.
    return "%032x" % _IDS.getrandbits(128)


def valid_target(target: bytes) -> bool:
    return (target[:1] == b"/" and not target.translate(None, _TARGET_CHARS)
            and (b"%" not in target or _BAD_ESCAPE.search(target) is None))


class Request:
    """One client request as the gateway sees it: the parsed head, the body as it arrives, and
    the calls that answer it on its connection."""

    __slots__ = ("conn", "method", "target", "path", "version", "headers", "authorization", "content_type",
                 "content_encoding", "content_length", "chunked", "expect_continue", "host", "hosts",
                 "preflight", "keep_alive", "refusal", "request_id", "complete", "too_large", "broken", "_body",
                 "_size", "_held", "_waiter", "_given_id", "_ids", "status", "bytes_out", "upstream_s", "head_sent",
                 "will_close", "_chunked_out", "finished", "aborter", "exchange", "client", "user_agent",
                 "upstream_start")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.method = ""
        self.target = b""
        self.path = ""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []   # as sent, in order, without Authorization
        self.authorization: list[bytes] = []
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.host: bytes | None = None
        self.hosts = 0
        self.preflight = False                          # carries Access-Control-Request-Method
        self.keep_alive = False
        self.refusal: Answer | None = None              # decided by the listener: answer this, nothing else
        self.request_id = ""
        self.complete = False                           # the whole message, body included, has arrived
        self.too_large = False
        self.broken = ""                                # why the body ended or broke before its end
        # One piece as it came, or one growing buffer: never a list of pieces, which a body sent in
        # tiny chunks would multiply many times over in object headers.
        self._body: bytes | bytearray = b""
        self._size = 0
        self._held = 0                                  # bytes this request counts against the budget
        self._waiter: asyncio.Future[None] | None = None
        self._given_id: bytes | None = None
        self._ids = 0
        # What the access log learns.
        self.status = 0
        self.bytes_out = 0
        self.upstream_s: float | None = None            # until the coordinator's headers; None: it never answered
        self.upstream_start = 0.0
        self.user_agent: bytes | None = None
        self.client = ""                                # set when a trusted proxy names the client; else the peer
        self.head_sent = False
        self.will_close = False
        self._chunked_out = False
        # Kept by the gateway while it answers.
        self.finished = False                           # the answer is written and observed
        self.aborter: Callable[[], None] | None = None  # stops work in flight outside a task if the client leaves
        self.exchange: Handling | None = None           # the handler's own state for this request

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def body_size(self) -> int:
        return self._size

    # -- the body

    async def read_body(self) -> bytes:
        """The whole body, once it has arrived. Sends `100 Continue` first when the client waits
        for it. BodyTooLarge, BodyTimeout, BodyIncomplete (TrailerTooLarge), Overloaded or ClientGone
        otherwise."""
        if self.broken:
            raise TrailerTooLarge() if self.broken == "trailer_too_large" else BodyIncomplete(self.broken)
        if not self.complete and not self.too_large:
            conn = self.conn
            if conn.closed:
                raise ClientGone()
            if self.expect_continue and self.version == b"1.1":
                self.expect_continue = False
                conn.transport.write(_CONTINUE)
            self._waiter = waiter = conn.loop.create_future()
            conn.wait_for_body()
            try:
                await waiter
            finally:
                self._waiter = None
                conn.body_done()
        return self.body_now()

    def body_now(self) -> bytes:
        """The whole body of a complete request (BodyTooLarge past limits.max_body_bytes)."""
        if self.too_large:
            raise BodyTooLarge()
        body = self._body
        if body.__class__ is bytearray:
            body = self._body = bytes(body)
        return body  # type: ignore[return-value]

    def _feed(self, chunk: bytes, limit: int) -> bool:
        self._size += len(chunk)
        if self._size > limit:
            self.too_large = True
            self._body = b""
            self._wake(None)
            return False
        body = self._body
        if not body:
            self._body = chunk
        elif body.__class__ is bytes:
            grown = self._body = bytearray(body)
            grown += chunk
        else:
            body += chunk
        return True

    def _break(self, reason: str) -> None:
        self.broken = reason
        self._wake(TrailerTooLarge() if reason == "trailer_too_large" else BodyIncomplete(reason))

    def _wake(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # -- the answer

    def _head(self, status: int, reason: bytes, length: int | None) -> list[bytes]:
        conn = self.conn
        self.will_close = close = (not self.keep_alive or not self.complete or conn.closing
                                   or (length is None and self.version == b"1.0"))
        self.head_sent = True
        self.status = status
        parts = [b"HTTP/", self.version, b" %d " % status, reason, b"\r\nX-Request-ID: ",
                 self.request_id.encode(), b"\r\n"]
        if close:
            if self.version == b"1.1":
                parts.append(b"Connection: close\r\n")
        elif self.version == b"1.0":
            parts.append(b"Connection: keep-alive\r\n")
        return parts

    def respond(self, answer: Answer) -> None:
        """Writes a gateway-made answer whole."""
        body = answer.body
        parts = self._head(answer.status, _reason(answer.status), len(body))
        parts += (b"Content-Type: ", answer.content_type, b"\r\nContent-Length: %d\r\n" % len(body),
                  http_date(int(time.time())))
        for name, value in answer.headers:
            parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        parts.append(b"\r\n")
        if self.method != "HEAD":
            parts.append(body)
            self.bytes_out = len(body)
        self.conn.write(b"".join(parts))

    def relay_whole(self, status: int, reason: bytes, block: bytes, dated: bool, body: bytes) -> None:
        """Writes a coordinator answer that arrived whole, as one buffer: its filtered header bytes as
        they came, framed for this hop."""
        parts = self._head(status, reason, len(body))
        parts.append(block)
        if not dated:
            parts.append(http_date(int(time.time())))  # RFC 9110 6.6.1: a proxy adds what a clockless origin left out
        if status < 200 or status in (204, 304):
            body = b""  # RFC 9110 6.4.1: these answers never have content
        else:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts += (b"\r\n", body)
        self.bytes_out = len(body)
        self.conn.write(b"".join(parts))

    def start_stream(self, status: int, reason: bytes, block: bytes, dated: bool, length: int | None) -> None:
        """Writes the head of an answer whose body follows in pieces: with the coordinator's
        Content-Length, else chunked (HTTP/1.1), else delimited by closing the connection."""
        parts = self._head(status, reason, length)
        parts.append(block)
        if not dated:
            parts.append(http_date(int(time.time())))
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif self.version == b"1.1":
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self._chunked_out = True
        parts.append(b"\r\n")
        self.conn.write(b"".join(parts))

    async def send(self, chunk: bytes) -> None:
        """One piece of a streamed body, written as it came; waits while the client is slow to read."""
        conn = self.conn
        if conn.closed:
            raise ClientGone()
        if not chunk:
            return  # an empty chunk would end a chunked body
        conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked_out else chunk)
        self.bytes_out += len(chunk)
        if conn.write_paused:
            await conn.drain()

    def end_stream(self) -> None:
        if self._chunked_out:
            self.conn.write(b"0\r\n\r\n")
        elif self.will_close:
            self.conn.close()

    def abort(self) -> None:
        """Ends the answer abnormally: the client sees a broken response, never a short success."""
        self.will_close = True
        self.conn.abort()

    # -- its life on the connection

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Continues answering in a task: for the stages that have to wait."""
        self.conn.spawn(self, work)

    def finish(self) -> None:
        """The answer is complete: the connection moves on to the next request, or closes."""
        self.finished = True
        self.conn.finished(self)


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests as they arrive and answers them in order."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self._limits = listener.limits
        self._handler = listener.handler.handle
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.peer = ""
        self._parser = httptools.HttpRequestParser(self)
        self.phase = Phase.HEAD
        self.deadline = 0.0
        self.send_deadline = 0.0    # unsent answer bytes must drain by then (limits.send_timeout_s); 0: none
        self.closing = False        # the listener is draining: answer what is in flight, then close
        self.closed = False
        self.lost = False           # connection_lost has run: the socket is gone
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._parsing: Request | None = None
        self._current: Request | None = None
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._advance_when_drained = False
        self._url = b""
        self._head_bytes = 0        # exact: the target and the header lines seen so far
        self._head_seen = 0         # coarse: whole reads spent inside one head
        self._in_head = False
        self._stopped = False       # no more requests are parsed on this connection
        self._reading = True
        self._eof = False
        self._budget = listener.budget
        self._head_charge = 0       # what the head being parsed counts against the budget
        self._budget_held = False   # the budget is full: not reading, whatever _reading says
        self._awaiting_room = False  # this body's reservation waits in the budget's queue
        self._reserved_body = False  # reading a body whose bytes are reserved: exempt from the hold
        self._transport_reading = True
        self._chunk_waiting = False  # a chunk size line was read and no data since: maybe the trailer section
        self._chunks_seen = 0
        self._trailers = 0
        self._held = b""            # read but not yet parsed: the pipelining queue was full
        self._advancing = False
        self._advance_again = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.deadline = self.loop.time() + self._limits.header_timeout_s
        self.listener.admit(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.deadline = self.loop.time() + self._limits.header_timeout_s
        if self._held:
            data, self._held = self._held + data, b""  # parsed in the order it came
        self._parse(data)
        if self._current is None and self._queue and not self.closed:
            # Begun after the whole read is parsed, never from inside llhttp: a request whose body
            # came in the same read is complete by now.
            self._begin(self._queue.popleft())

    def _parse(self, data: bytes) -> None:
        """Parses as much of `data` as the pipelining queue has room for; holds the rest."""
        room = MAX_PIPELINED - len(self._queue)
        if data.count(b"\n") < 2 * room:
            self._feed(data)  # cannot hold more heads than there is room for
            return
        start = 0
        while start < len(data) and not self._stopped and not self.closed:
            room = MAX_PIPELINED - len(self._queue)
            if room <= 0:
                self._held = data[start:]
                self._pause_reading()
                return
            end = start
            for _ in range(room):
                found = _HEAD_END.search(data, end)
                if found is None:
                    end = len(data)
                    break
                end = found.end()
            self._feed(data[start:end])
            start = end

    def _feed(self, data: bytes) -> None:
        was_in_head = self._in_head
        in_trailer = self._chunk_waiting
        if in_trailer:
            chunks = self._chunks_seen
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades are not offered: the request is answered as a plain one, then the connection
            # closes, since what follows its head is some other protocol.
            self._stop()
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, refused.reason, refused.message)
            else:
                self._refuse_parse(exc, data)
        else:
            if was_in_head and self._in_head:
                # llhttp buffers a header line until it ends: bound it by what has arrived.
                self._head_seen += len(data)
                if self._head_seen > self._limits.max_header_bytes:
                    self._refuse(431, "header_too_large", "The request head is too large")
            elif in_trailer and self._chunk_waiting and self._chunks_seen == chunks:
                # A whole read after a chunk size line and no data: the trailer section, which llhttp
                # buffers (and httptools copies per piece) like a header line.
                self._head_seen += len(data)
                if self._head_seen > self._limits.max_header_bytes:
                    self._refuse(431, "trailer_too_large", "The request trailer section is too large")
            if self._in_head and not self._stopped:
                # Until the head is whole it holds at most what was read since it began.
                self._head_charge += len(data)
                self._budget.take(len(data))

    def eof_received(self) -> bool:
        self._eof = True
        if self.phase is Phase.LINGER:
            return False  # both sides are done: the transport closes
        parsing = self._parsing
        if parsing is not None:
            parsing._break("incomplete_body")
        # Keep the writing side open while an answer is owed.
        return self._current is not None or bool(self._queue) or bool(self._held)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = True
        self.send_deadline = 0.0
        self.listener.forget(self)
        self._budget.forget(self)
        self._uncharge_head()
        for held in (self._current, self._parsing, *self._queue):
            if held is not None:
                self._release(held)
        for request in (self._current, self._parsing):
            if request is not None:
                request._wake(ClientGone())
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ClientGone())
        current = self._current
        if current is not None and not current.finished:
            aborter, current.aborter = current.aborter, None
            if aborter is not None:
                aborter()
            if self._task is not None:
                self._task.cancel()
            self.listener.abandoned(current, 499)  # nginx's status for a client that left first
            current.finished = True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self.loop.time() + self._limits.send_timeout_s

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = 0.0
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._advance_when_drained:
            self._advance_when_drained = False
            self._advance()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if len(self._queue) >= MAX_PIPELINED or self.closed:
            self._stopped = True
            raise _Refused(0, "", "")  # stops the parser; nothing more is read (see _refuse)
        self._parsing = Request(self)
        self._in_head = True
        self._url = b""
        self._head_bytes = 0
        self._head_seen = 0
        self._trailers = 0
        self._chunk_waiting = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            raise _Refused(414, "target_too_long", "The request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        self._head_bytes += len(name) + len(value) + 4
        if not self._in_head:
            # Trailer fields of a chunked body: never headers of the request, but counted with them.
            self._trailers += 1
            if (self._head_bytes > self._limits.max_header_bytes or self._trailers + len(request.headers)
                    + len(request.authorization) > self._limits.max_headers):
                raise _Refused(431, "trailer_too_large", "The request trailer section is too large")
            return
        if self._head_bytes > self._limits.max_header_bytes:
            raise _Refused(431, "header_too_large", "The request head is too large")
        low = name.lower()
        if low == b"authorization":
            request.authorization.append(value)
            return  # kept out of `headers`, so no header cache ever holds a token
        request.headers.append((name, value))
        if low not in _NOTED:
            return
        if low == b"content-type":
            request.content_type = value
        elif low == b"content-length":
            request.content_length = int(value)  # llhttp has checked it: digits, and only one
        elif low == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                # Other codings would have to be undone before the body means anything; the edge undoes none.
                raise _Refused(501, "unsupported_transfer_coding", "Only the chunked transfer coding is accepted")
            request.chunked = True
        elif low == b"content-encoding":
            request.content_encoding = value
        elif low == b"host":
            request.host = value
            request.hosts += 1
        elif low == b"x-request-id":
            request._given_id = value
            request._ids += 1
        elif low == b"expect":
            request.expect_continue = value.lower() == b"100-continue"
        elif low == b"user-agent":
            request.user_agent = value
        else:
            request.preflight = True  # Access-Control-Request-Method

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._in_head = False
        # What the request keeps of its head (target and header lines) is held until it ends.
        self._uncharge_head()
        request._held = self._head_bytes
        self._budget.take(self._head_bytes)
        # Counted once the head is whole: its bytes, bounded above, already bound the memory it took.
        if len(request.headers) + len(request.authorization) > self._limits.max_headers:
            raise _Refused(431, "too_many_headers", "The request has too many header fields")
        parser = self._parser
        request.method = parser.get_method().decode("latin-1")
        request.keep_alive = parser.should_keep_alive()
        length = request.content_length
        if length and length <= self._limits.max_body_bytes:
            if self._budget.reserve(self, length):
                request._held += length
                self._reserved_body = True
            else:
                self._awaiting_room = True
                self._apply_reading()
        request.target = target = self._url
        request.request_id = new_request_id(request._given_id if request._ids == 1 else None)
        version = _VERSIONS.get(parser.get_http_version())
        stop = False
        if version is None:
            request.refusal = error_answer(505, "http_version_not_supported", "Use HTTP/1.1 or HTTP/1.0",
                                           request_id=request.request_id)
        else:
            request.version = version
            authority = None
            if target[:1] != b"/" and (absolute := _ABSOLUTE.fullmatch(target)) is not None:
                # Routed on its path; forwarded in origin-form, as the coordinator would expect.
                authority, rest = absolute.groups()
                request.target = target = rest if rest[:1] == b"/" else b"/" + rest
            if not valid_target(target):
                request.refusal = _bad(request, "invalid_target",
                                       "The request target must be an origin-form path of RFC 3986 characters")
            elif request.hosts > 1 or (request.hosts == 0 and version == b"1.1"):
                request.refusal = _bad(request, "invalid_host", "Send exactly one Host header")
            elif request.host is not None and request.host.translate(None, _HOST_CHARS):
                request.refusal = _bad(request, "invalid_host", "The Host header is not a valid authority")
            elif authority is not None and (request.host is None or authority.lower() != request.host.lower()):
                # RFC 9112 3.2: a client sends Host identical to the target's authority; one that does not
                # leaves two answers to which host is meant, and the gateway picks neither.
                request.refusal = _bad(request, "invalid_host", "The Host header must equal the target's authority")
            elif request.chunked and version == b"1.0":
                # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing: answer, then close.
                request.refusal = _bad(request, "bad_framing", "HTTP/1.0 requests cannot use Transfer-Encoding")
                stop = True
            elif request.has_body and parser.should_upgrade():
                # Upgrades are not offered, and llhttp ends an upgrade request at its head, handing over the
                # rest as another protocol's bytes: its body would be dropped, and the request forwarded
                # without it. (Upgrade without `Connection: upgrade` is no upgrade: its body is framed as usual.)
                request.refusal = _bad(request, "upgrade_with_body", "A request with Upgrade cannot carry a body")
                stop = True
            else:
                request.path = target.partition(b"?")[0].decode("ascii")
        self._queue.append(request)  # begun once this read is parsed, when its turn comes
        if stop:
            # Its framing cannot be trusted: nothing after its head is parsed, so none of it is forwarded,
            # and the connection closes after the answer.
            request.keep_alive = False
            self._stopped = True
            raise _Refused(0, "", "")

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        self._chunk_waiting = False
        if not request._feed(body, self._limits.max_body_bytes):
            self._budget.give(request._held - self._head_bytes)
            request._held = self._head_bytes
            self._stop()  # the answer is a 413; nothing more of this connection is worth reading
            raise _Refused(0, "", "")
        if not self._reserved_body:
            request._held += len(body)
            self._budget.take(len(body))

    def on_chunk_header(self) -> None:
        self._chunk_waiting = True
        self._chunks_seen += 1
        self._head_seen = 0

    def on_chunk_complete(self) -> None:
        self._chunk_waiting = False

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._parsing = None
        request.complete = True
        if self._reserved_body or self._awaiting_room:
            # Done with this body's reservation; one that waited got its bytes charged as they came.
            if self._awaiting_room:
                self._awaiting_room = False
                self._budget.forget(self)
            self._reserved_body = False
            self._apply_reading()
        request._wake(None)
        if self._current is not None and request is not self._current:
            # A whole request waits its turn: read no further until it is answered.
            self._pause_reading()

    # -- answering, in order

    def _begin(self, request: Request) -> None:
        """Answers `request` now: the gateway runs every stage it can without waiting, and
        continues in a task (spawn) only for those that must."""
        self._current = request
        self.phase = Phase.BUSY
        self.deadline = 0.0
        try:
            self._handler(request)
        except Exception:
            self._internal_error(request)

    def spawn(self, request: Request, work: Coroutine[Any, Any, None]) -> None:
        self._task = self.loop.create_task(self._run(request, work))

    async def _run(self, request: Request, work: Coroutine[Any, Any, None]) -> None:
        task = self._task
        try:
            await work
        except (asyncio.CancelledError, ClientGone):
            pass  # the client left: connection_lost has reported it
        except Exception:
            self._internal_error(request)
        finally:
            if self._task is task:
                self._task = None

    def _internal_error(self, request: Request) -> None:
        log.exception("request handling failed", extra={"event": "internal_error",
                                                        "request_id": request.request_id})
        if request.finished:
            return
        if not request.head_sent and not self.closed:
            request.respond(error_answer(500, "internal_error", "The gateway failed to answer",
                                         request_id=request.request_id))
        request.will_close = True
        self.listener.abandoned(request, 500)
        request.finish()

    def finished(self, request: Request) -> None:
        self._release(request)
        if request is not self._current or self.closed:
            return
        if request.will_close or self.closing or (self._eof and not self._queue and not self._held):
            self.close()
        elif self.write_paused:
            self._advance_when_drained = True  # the client is slow to take large answers: wait for it
        else:
            self._advance()

    def _advance(self) -> None:
        # Requests answered without waiting finish inside _begin, which would advance again from there:
        # run such advances one after another here instead, so a long pipeline cannot nest deeper
        # with each request.
        if self._advancing:
            self._advance_again = True
            return
        self._advancing = True
        try:
            self._advance_again = True
            while self._advance_again:
                self._advance_again = False
                self._advance_once()
        finally:
            self._advancing = False

    def _advance_once(self) -> None:
        if self._held and not self._stopped:
            held, self._held = self._held, b""
            self._parse(held)
        if self._queue:
            self._begin(self._queue.popleft())
            return
        self._current = None
        if self._stopped:
            self.close()
            return
        if not self._reading:
            self._resume_reading()
        if self._in_head:
            self.phase = Phase.HEAD
            self.deadline = self.loop.time() + self._limits.header_timeout_s
        else:
            self.phase = Phase.IDLE
            self.deadline = self.loop.time() + self._limits.keepalive_timeout_s

    # -- refusals decided here

    def _refuse_parse(self, exc: httptools.HttpParserError, data: bytes) -> None:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, httptools.HttpParserInvalidMethodError) and _REQUEST_LINE.match(data):
            self._refuse(501, "unknown_method", "The request method is not implemented")
        elif "content-length" in message.lower() or "transfer-encoding" in message.lower():
            self._refuse(400, "bad_framing", "The request framing is invalid")
        else:
            self._refuse(400, "malformed_request", "The request is not valid HTTP/1.1")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Stops parsing; the request being parsed (or a stand-in) is answered with this, then the
        connection closes."""
        self._stop()
        if status == 0:
            return  # parsing stopped on purpose, the answer is already decided
        request = self._parsing
        self._parsing = None
        if request is not None and (request is self._current or request in self._queue):
            # Its head was fine and it is being answered: what broke is its body.
            request._break("trailer_too_large" if reason == "trailer_too_large" else "bad_framing")
            request.keep_alive = False
            if request is self._current:
                return
        if request is None or request.head_sent:
            request = Request(self)
        self._in_head = False
        request.keep_alive = False
        request.request_id = request.request_id or new_request_id(None)
        code = {400: "invalid_request", 408: "request_timeout", 413: "payload_too_large",
                414: "uri_too_long", 431: "request_header_fields_too_large",
                501: "not_implemented", 503: "overloaded",
                505: "http_version_not_supported"}.get(status, "invalid_request")
        request.refusal = error_answer(status, code, message, request_id=request.request_id,
                                       details={"reason": reason}, retryable=True if status == 503 else None)
        if request is not self._current and request not in self._queue:
            self._queue.append(request)

    def _stop(self) -> None:
        self._stopped = True
        self._pause_reading()

    # -- deadlines (checked by the listener's sweep)

    def wait_for_body(self) -> None:
        self.phase = Phase.BODY
        self.deadline = self.loop.time() + self._limits.body_timeout_s
        self._resume_reading()

    def body_done(self) -> None:
        self.phase = Phase.BUSY
        self.deadline = 0.0

    def expire(self) -> None:
        """The deadline of the current phase passed."""
        phase = self.phase
        self.deadline = 0.0
        if phase is Phase.LINGER:
            self.abort()
        elif phase is not Phase.IDLE and (self._awaiting_room or (self._budget_held and not self._reserved_body)):
            self._overloaded(phase)
        elif phase is Phase.BODY:
            self.listener.closed_for("body_timeout")
            if self._current is not None:
                self._current._wake(BodyTimeout())
        else:
            self.listener.closed_for("keepalive_timeout" if phase is Phase.IDLE else "header_timeout")
            self.close_now()

    def send_expired(self) -> None:
        """Answer bytes stayed unread for limits.send_timeout_s: the socket is freed, the bytes dropped."""
        self.send_deadline = 0.0
        self.listener.closed_for("send_timeout")
        self.abort()

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size() if not self.lost else 0

    def _overloaded(self, phase: Phase) -> None:
        """The budget stayed full for this connection's whole head or body timeout: 503, retryable,
        rather than a 408 the client did not cause."""
        self.listener.overloaded("body" if phase is Phase.BODY else "head")
        if phase is Phase.BODY:
            if self._current is not None:
                self._current._wake(Overloaded())
            return
        self._refuse(503, "buffer_budget_full", "The gateway holds too many request bytes; retry shortly")
        if self._current is None and self._queue:
            self._begin(self._queue.popleft())

    # -- the memory budget

    def _release(self, request: Request) -> None:
        held = request._held
        if held:
            request._held = 0
            self._budget.give(held)

    def _uncharge_head(self) -> None:
        charge = self._head_charge
        if charge:
            self._head_charge = 0
            self._budget.give(charge)

    def hold_reading(self) -> None:
        """The budget is full: read nothing more until it has room (but a reserved body, paid for)."""
        if not self._budget_held:
            self._budget_held = True
            self._apply_reading()

    def release_reading(self) -> None:
        if self._budget_held:
            self._budget_held = False
            self._apply_reading()

    def room_needed(self) -> int:
        """What the body waiting for a reservation still needs (0: it needs nothing any more)."""
        request = self._parsing
        if self.closed or request is None or request.content_length is None:
            return 0
        return max(0, request.content_length - request.body_size)

    def admitted(self, size: int) -> None:
        """The budget reserved `size` more for the body that waited (0: it no longer needs any)."""
        self._awaiting_room = False
        request = self._parsing
        if size and request is not None:
            request._held += size
            self._reserved_body = True
        self._apply_reading()

    def _apply_reading(self) -> None:
        """The transport reads when the connection wants to and the budget lets it."""
        want = (self._reading and not self._awaiting_room and (self._reserved_body or not self._budget_held))
        if want is not self._transport_reading and not self.closed:
            self._transport_reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    @property
    def reclaimable(self) -> bool:
        return not self.closed and (self.phase is Phase.IDLE or (self.phase is Phase.HEAD and self._current is None))

    # -- transport

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone()
        if self.write_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _pause_reading(self) -> None:
        if self._reading and not self.closed:
            self._reading = False
            self._apply_reading()

    def _resume_reading(self) -> None:
        if not self._reading and not self.closed and not self._stopped and not self._held:
            self._reading = True
            self._apply_reading()

    # A closed connection stays in the listener's count until connection_lost: the transport keeps
    # the socket open while unsent bytes remain, and they have send_timeout_s to drain.

    def close(self) -> None:
        """Closes after an answer: its bytes still go out (within send_timeout_s), and a client that
        may still be sending is drained first (_linger)."""
        if not self.closed:
            self.closed = True
            if not self._eof and not self.lost and self._may_still_send():
                self._linger()
                return
            self.deadline = 0.0
            self.transport.close()
            if self.send_deadline == 0.0 and self.unsent():
                self.send_deadline = self.loop.time() + self._limits.send_timeout_s

    def close_now(self) -> None:
        """Closes for a timeout or to reclaim the slot: no answer is owed, so nothing lingers, and unsent
        bytes (a client that does not read) are dropped rather than holding the socket open."""
        if self.unsent():
            self.abort()
        elif not self.closed:
            self.closed = True
            self.deadline = 0.0
            self.transport.close()

    def _may_still_send(self) -> bool:
        current = self._current
        return (self._stopped or self._parsing is not None or bool(self._held)
                or (current is not None and not current.complete))

    def _linger(self) -> None:
        """Closing while the client may still be sending (a refused body, bad framing): the answer
        goes out, then a FIN, and what still arrives is read and dropped until the client closes its side
        or LINGER_S passes. Closing at once would reset the connection, and a reset can destroy the
        answer in the client's buffers before it is read."""
        self.phase = Phase.LINGER
        self._stopped = True  # data_received drops everything from now on
        self.deadline = self.loop.time() + LINGER_S
        if self.send_deadline == 0.0 and self.unsent():
            self.send_deadline = self.loop.time() + self._limits.send_timeout_s
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        self.transport.resume_reading()

    def abort(self) -> None:
        if not self.lost:
            self.closed = True
            self.deadline = self.send_deadline = 0.0
            self.transport.abort()

    def shut_down(self) -> None:
        """Draining: an idle connection closes now, a busy one after its answer."""
        self.closing = True
        if self.reclaimable:
            self.close()


_NOTED = frozenset({b"content-type", b"content-length", b"transfer-encoding", b"content-encoding", b"host",
                    b"x-request-id", b"expect", b"access-control-request-method", b"user-agent"})


def _bad(request: Request, reason: str, message: str) -> Answer:
    return error_answer(400, "invalid_request", message, request_id=request.request_id,
                        details={"reason": reason})


class Handling(Protocol):
    """What a handler keeps per request; the listener only carries it for the handler."""

    def abandoned(self, status: int) -> None:
        """The request ended without `finish()` (see `Handler.abandoned`)."""


class Handler(Protocol):
    """What the listener hands requests to: the gateway."""

    def handle(self, request: Request) -> None:
        """Answers `request`, then calls `request.finish()`; may continue in `request.spawn(...)`."""

    def abandoned(self, request: Request, status: int) -> None:
        """`request` ended without `finish()`: the client left (499), or handling failed (500)."""


def _expire(conn: ClientConnection, now: float) -> None:
    if 0.0 < conn.send_deadline <= now:
        conn.send_expired()
    elif 0.0 < conn.deadline <= now:
        conn.expire()


class Listener:
    """The public port: accepts connections within the cap and keeps their deadlines."""

    def __init__(self, handler: Handler, limits: EdgeLimits, metrics: object | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.connections: dict[ClientConnection, None] = {}  # insertion order: oldest first
        self._server: asyncio.AbstractServer | None = None
        self._sweep = DeadlineSweep("listener", limits.sweep_interval_s, due=self._due, expire=_expire)
        self._last_warning = -LIMIT_LOG_INTERVAL_S
        self._last_overload_warning = -LIMIT_LOG_INTERVAL_S
        self._probe_fd = -1
        self._all_closed: asyncio.Event | None = None
        self.budget = Budget(limits.max_buffered_bytes, self._hold_all, self._release_all)

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> str:
        self.loop = loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ClientConnection(self), host, port,
                                                reuse_port=reuse_port or None, backlog=backlog)
        self._watch_accept_errors()
        # libuv meets EMFILE on accept() by accepting and closing the connection itself, unseen by
        # the exception handler: under uvloop each sweep pass probes for a full descriptor table.
        self._probe_fd = self._server.sockets[0].fileno() if type(loop).__module__.startswith("uvloop") else -1
        self._sweep.start(loop)
        sock = self._server.sockets[0]
        addr, bound = sock.getsockname()[:2]
        return f"http://{'[' + addr + ']' if ':' in addr else addr}:{bound}"

    # -- the connection cap

    def admit(self, conn: ClientConnection) -> None:
        if len(self.connections) >= self.limits.max_connections:
            victim = self._oldest_reclaimable()
            if victim is None:
                self._limit_reached("max_connections")
                self._count("connections_refused", "max_connections")
                conn.closed = True
                conn.transport.close()
                return
            self._limit_reached("reclaimed")
            self.closed_for("reclaimed")
            victim.close_now()
        budget = self.budget
        if budget.full:
            if budget.used >= budget.ceiling:
                self._limit_reached("buffer_budget")
                self._count("connections_refused", "buffer_budget")
                conn.closed = True
                conn.transport.close()
                return
            # Not from connection_made: uvloop starts reading once it returns, undoing a pause made
            # here, and reads once before a callback scheduled now can pause it. That one read per
            # connection accepted while the budget is full is what `ceiling` bounds.
            self.loop.call_soon(conn.hold_reading)
        self.connections[conn] = None

    def _oldest_reclaimable(self) -> ClientConnection | None:
        fallback = None
        for conn in self.connections:
            if conn.closed:
                continue  # on its way out already, counted until connection_lost
            if conn.phase is Phase.IDLE:
                return conn
            if fallback is None and conn.reclaimable:
                fallback = conn
        return fallback

    def forget(self, conn: ClientConnection) -> None:
        self.connections.pop(conn, None)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def abandoned(self, request: Request, status: int) -> None:
        self.handler.abandoned(request, status)

    # -- the memory budget

    def _hold_all(self) -> None:
        for conn in self.connections:
            conn.hold_reading()

    def _release_all(self) -> None:
        for conn in list(self.connections):
            conn.release_reading()

    def overloaded(self, waiting_for: str) -> None:
        """A head or body starved of the budget for its whole timeout: counted, and said at most every 10 s."""
        if self.metrics is not None:
            self.metrics.overloaded(waiting_for)  # type: ignore[attr-defined]
        now = self.loop.time()
        if now - self._last_overload_warning >= LIMIT_LOG_INTERVAL_S:
            self._last_overload_warning = now
            log.warning("buffer budget full: refusing with 503", extra={
                "event": "overloaded", "waiting_for": waiting_for, "buffered_bytes": self.budget.used,
                "max_buffered_bytes": self.budget.limit, "open": len(self.connections)})

    def closed_for(self, reason: str) -> None:
        self._count("connections_closed", reason)

    def _count(self, family: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connection_event(family, reason)  # type: ignore[attr-defined]

    def _limit_reached(self, what: str) -> None:
        now = self.loop.time()
        if now - self._last_warning >= LIMIT_LOG_INTERVAL_S:
            self._last_warning = now
            log.warning("connection limit reached", extra={
                "event": "connection_limit", "action": what, "open": len(self.connections),
                "max_connections": self.limits.max_connections, "buffered_bytes": self.budget.used})

    def _watch_accept_errors(self) -> None:
        """At the file-descriptor limit accept() fails: count it and say so, at most every 10 s,
        instead of asyncio's traceback per failed accept."""
        loop = self.loop
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                self._count("connections_refused", "fd_limit")
                self._limit_reached("fd_limit")
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def _probe_fds(self) -> None:
        try:
            os.close(os.dup(self._probe_fd))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._count("connections_refused", "fd_limit")
                self._limit_reached("fd_limit")

    # -- deadlines

    def _due(self, now: float) -> list[ClientConnection]:
        if self._probe_fd >= 0:
            self._probe_fds()
        return [conn for conn in self.connections
                if 0.0 < conn.deadline <= now or 0.0 < conn.send_deadline <= now]

    # -- shutdown

    async def close(self, grace_s: float) -> None:
        """Stops accepting; in-flight answers (streams included) get `grace_s` to finish, then
        whatever is left is cut."""
        if self._server is not None:
            self._server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.shut_down()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
            except asyncio.TimeoutError:
                for conn in list(self.connections):
                    conn.abort()
        self._sweep.stop()
        if self._server is not None:
            await self._server.wait_closed()
