"""A keep-alive HTTP/1.1 connection pool to the Run Coordinator, on asyncio protocols.

This is the data plane. aiohttp's client spends most of the gateway's CPU
per proxied request (request and response objects, tracing hooks, the timer
machinery; tests/bench/results has the figures); this pool does the same
exchange in a fraction of that. Parsing is llhttp through httptools
(the parser uvicorn uses), never hand-written. The control plane (JWKS,
discovery, token exchange, health probes) stays on aiohttp's client.

    pool = UpstreamPool("http://127.0.0.1:8081", max_connections=100, connect_timeout_s=2)
    response = await pool.request(b"POST /v1/runs HTTP/1.1\\r\\n...\\r\\n\\r\\n", body)
    async for chunk in response.chunks(idle_timeout_s=300):
        ...
    response.release()          # back to the pool if the exchange ended cleanly, else closed
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools

from ..edge.sweep import DeadlineSweep

# Reading pauses when this much body is waiting for a slow client, so memory stays bounded.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# The coordinator's status line and header lines together, unless configured otherwise.
MAX_RESPONSE_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The exchange with the coordinator failed; `kind` is the metrics label."""

    kind = "protocol"

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent  # False: the request provably never reached the coordinator


class ConnectFailed(UpstreamError):
    kind = "connect"


class ConnectionReset(UpstreamError):
    kind = "reset"


class BadResponse(UpstreamError):
    kind = "protocol"


class StreamIdle(UpstreamError):
    kind = "timeout"


class PoolBusy(TimeoutError):
    """Every connection stayed busy for `queue_timeout_s`: the coordinator is saturated, so the
    request is shed instead of queueing without bound. The request never left the gateway.

    A TimeoutError on purpose: a caller that does not know this class yet still answers a timeout
    and, as for any timeout, does not retry it (a retry would only queue again)."""

    kind = "busy"
    sent = False


class PoolResponse:
    """One response: headers at once, the body as it arrives."""

    __slots__ = ("status", "headers", "complete", "error", "keep_alive", "close_delimited", "codings_checked",
                 "_conn", "_chunks", "_buffered", "_waiter", "_paused")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.error: UpstreamError | None = None
        self.keep_alive = False
        # The body ends where the coordinator closes the connection (RFC 9112 6.3 rule 8).
        self.close_delimited = False
        self.codings_checked = False
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    @property
    def content_length(self) -> int | None:
        """The declared length of a body that streams (llhttp has checked it: digits, and one value)."""
        for name, value in self.headers:
            if name.lower() == b"content-length":
                return int(value)
        return None

    def body_if_complete(self) -> bytes | None:
        """The whole body when it already arrived with the headers (the usual JSON answer)."""
        if not self.complete:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= LOW_WATER and self._conn is not None:
                    self._paused = False
                    self._conn.resume_reading()
                yield chunk
                continue
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(idle_timeout_s):
                    await self._waiter
            except TimeoutError:
                raise StreamIdle(f"no data from the coordinator for {idle_timeout_s:g} s") from None
            finally:
                self._waiter = None

    def release(self) -> None:
        """Returns the connection for reuse if the exchange finished cleanly; otherwise closes it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(reusable=self.complete and self.keep_alive and self.error is None)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(reusable=False)

    # -- fed by the connection

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self.complete and self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


HeadersCallback = Callable[["PoolResponse | None", "UpstreamError | TimeoutError | None"], None]


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        # Kept: on Python 3.11 each get_running_loop() costs a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: PoolResponse | None = None
        # Callback mode (start()): called once with the response when its headers are in, or with the
        # error that ended the exchange first. No future and no task between request and answer.
        self._on_headers: HeadersCallback | None = None
        self.reused = False
        self.closed = False
        self.deadline = 0.0         # event-loop time the response headers are due by; 0: none
        self.idle_since = 0.0
        self.received_any = False
        self.stream = False         # holds one of the pool's stream slots (UpstreamPool.stream_slots)
        # The response head is bounded twice: by its parsed lines, and by the bytes read since the
        # last progress (the request, the end of the head, a piece of body), since llhttp holds an
        # unfinished header or trailer line in memory until it ends.
        self._in_head = False
        self._head_lines = 0
        self._unparsed = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self._abort()
            return
        self.received_any = True
        self._unparsed += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._abort()
            if not self.response.complete:
                cause = exc.__context__
                self._error(cause if isinstance(cause, BadResponse)
                            else BadResponse(f"invalid HTTP from the coordinator: {exc!r}"))
                return
            # What broke came after a complete answer (an unrequested second one): that answer
            # stands, and the connection, closed now, is never reused.
        if self._unparsed > self._pool.max_head and not self.response.complete:
            self._abort()
            self._error(self._head_too_large() if self._in_head else BadResponse(
                f"the coordinator's trailer section is over {self._pool.max_head} bytes"))
            return
        callback = self._on_headers
        if callback is not None and self.response.status >= 200:
            # Called after the whole read is parsed, so an answer that came in one piece is complete.
            self._on_headers = None
            self.deadline = 0.0
            callback(self.response, None)

    def eof_received(self) -> bool | None:
        self._parser_eof()
        self._body_closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser_eof()
        if exc is None:
            self._body_closed()
        if self.response is not None and not self.response.complete:
            self._error(ConnectionReset("the coordinator closed the connection", sent=True))
        self._pool.forget(self)

    # -- httptools callbacks

    def _unrequested(self) -> BadResponse:
        # A second answer to one request: whatever it is, no client gets it, and the connection's
        # framing can no longer be trusted. Checked where a message shows itself (its status line,
        # a header, the end of its head) rather than in a callback of its own per message.
        self.closed = True
        return BadResponse("the coordinator sent an unrequested response")

    def _head_too_large(self) -> BadResponse:
        return BadResponse(f"the coordinator's response head is over {self._pool.max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        if response.complete:
            raise self._unrequested()
        if not self._in_head:
            return  # a trailer field: RFC 9110 6.5.1 forbids relaying it as a header
        self._head_lines += len(name) + len(value) + 4
        if self._head_lines > self._pool.max_head:
            raise self._head_too_large()
        response.headers.append((name, value))

    def on_status(self, reason: bytes) -> None:
        # The reason phrase is never relayed (the gateway writes its own), only counted.
        response = self.response
        assert response is not None
        if response.complete:
            raise self._unrequested()
        self._head_lines += len(reason) + 15

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        if response.complete:
            raise self._unrequested()
        status = self._parser.get_status_code()
        if not 100 <= status <= 599 or status == 101:
            # 101: the gateway never asks to switch protocols, so the connection's bytes would
            # no longer be HTTP.
            raise BadResponse(f"the coordinator answered with status {status}")
        response.status = status
        if status < 200:
            # An interim 1xx answer (100, 103): dropped; its lines still count toward the head's bound.
            response.headers.clear()
            return
        self._in_head = False
        self._unparsed = 0
        response.keep_alive = self._parser.should_keep_alive()
        if not response.keep_alive:
            self._framing(response)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self._unparsed = 0
        self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if response.status < 200:
            return
        response.keep_alive = self._parser.should_keep_alive()
        response.complete = True
        response._wake()

    # -- used by the pool and the response

    @staticmethod
    def _framing(response: PoolResponse) -> None:
        """For an answer that ends the connection: whether its body is delimited by the close. Only
        answers without keep-alive get here, so the usual exchange pays nothing for it."""
        codings, length = _codings(response.headers)
        response.codings_checked = True
        response.close_delimited = not codings and not length and response.status not in (204, 304)

    def on_chunk_header(self) -> None:
        # Only chunked bodies get here, once per chunk: the one place a kept-alive answer shows a
        # coding before `chunked` (`gzip, chunked`), checked once per answer. Answers with a
        # Content-Length, the usual run start, never pay for it.
        response = self.response
        if response is not None and not response.codings_checked:
            response.codings_checked = True
            _codings(response.headers)

    def _body_closed(self) -> None:
        """The coordinator closed its side: a body delimited by the close is complete now
        (RFC 9112 6.3 rule 8). llhttp itself only ends such a message on llhttp_finish(), which
        httptools does not offer."""
        response = self.response
        if response is not None and response.close_delimited and not response.complete \
                and response.error is None:
            response.complete = True
            response._wake()

    def _parser_eof(self) -> None:
        try:
            self._parser.feed_data(b"")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            pass

    def _error(self, error: UpstreamError | TimeoutError) -> None:
        callback = self._on_headers
        if callback is not None:
            self._on_headers = None
            self.deadline = 0.0
            if self.reused and isinstance(error, ConnectionReset) and not self.received_any:
                self._pool._drop_idle()
            callback(None, error)
        elif self.response is not None and isinstance(error, UpstreamError):
            self.response._fail(error)

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    async def send(self, head: bytes, body: bytes | None, deadline: float | None) -> PoolResponse:
        """`start`, awaited: the response once its headers are in, or the error that ended the exchange."""
        ready: asyncio.Future[PoolResponse] = self._loop.create_future()

        def settle(response: PoolResponse | None, error: UpstreamError | TimeoutError | None) -> None:
            if ready.done():
                return
            if response is not None:
                ready.set_result(response)
            else:
                ready.set_exception(error or UpstreamError("the exchange ended"))

        # The parser is the connection's: llhttp starts on the next message after a complete one,
        # and a connection whose exchange did not complete is never reused.
        self.start(head, body, deadline or 0.0, settle)  # a deadline of 0: kept by the caller alone
        try:
            return await ready
        finally:
            self.deadline = 0.0

    def start(self, head: bytes, body: bytes | None, deadline: float, on_headers: HeadersCallback) -> None:
        """Sends one request; `on_headers` gets the response once its headers are in (with as much
        of the body as came with them), or the error that ended the exchange before that."""
        assert self.transport is not None
        self.response = PoolResponse(self)
        self._on_headers = on_headers
        self.deadline = deadline
        self.received_any = False
        self._in_head, self._head_lines, self._unparsed = True, 0, 0
        self.transport.write(head + body if body else head)

    def expire(self) -> None:
        self._error(TimeoutError())

    def finish(self, *, reusable: bool) -> None:
        self.response = None
        self._on_headers = None
        if self.stream:
            self.stream = False
            self._pool.stream_ended()
        if reusable and not self.closed:
            self._pool.give_back(self)
        else:
            self._abort()
            self._pool.forget(self)


def _expire_conn(conn: _Connection, now: float) -> None:
    # Cleared only once the expiry went through: one that failed is tried again on the next pass.
    conn.expire()
    conn.deadline = 0.0


def _codings(headers: list[tuple[bytes, bytes]]) -> tuple[list[bytes], bool]:
    """The answer's transfer codings and whether it declares a length. BadResponse for a coding
    other than chunked: llhttp undoes only the chunking, and this hop drops the Transfer-Encoding
    line, so the client would take the still-coded bytes for the content."""
    codings: list[bytes] = []
    length = False
    for name, value in headers:
        low = name.lower()
        if low == b"transfer-encoding":
            codings += (c.strip().lower() for c in value.split(b","))
        elif low == b"content-length":
            length = True
    if any(c != b"chunked" for c in codings):
        raise BadResponse("the coordinator used a transfer coding other than chunked")
    return codings, length


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class UpstreamPool:
    def __init__(self, url: str, *, max_connections: int, connect_timeout_s: float,
                 idle_timeout_s: float = 4.0, sweep_interval_s: float = 0.1,
                 queue_timeout_s: float | None = 1.0, stream_share: float = 1.0,
                 max_response_head_bytes: int = MAX_RESPONSE_HEAD,
                 ssl_context: Callable[[], ssl.SSLContext] | None = None, server_name: str | None = None) -> None:
        """`ssl_context` gives the context for each new connection (reloaded certificates are used by
        the next connection); unset, an https:// URL is verified against the system trust store.
        `server_name` is the name sent (SNI) and verified instead of the URL's host."""
        parts = urlsplit(url)
        self._secure = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._secure else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1].encode("idna")
        self.base_path = parts.path.rstrip("/").encode()
        self._max = max_connections
        self._connect_timeout = connect_timeout_s
        # Below common server keep-alive timeouts (uvicorn: 5 s), so we drop a connection before the
        # server does and never send a request into a socket the coordinator is closing.
        self._idle_timeout = idle_timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._ssl = ssl.create_default_context() if self._secure and ssl_context is None else None
        self._ssl_context = ssl_context if self._secure else None
        self._server_name = server_name if self._secure else None
        self.closed = False
        self._sweep = DeadlineSweep("upstream_pool", sweep_interval_s, due=self._due, expire=_expire_conn)
        # None: wait for a connection until the request's own deadline (the old behaviour).
        self._queue_timeout = queue_timeout_s
        # Counters for metrics: requests that had to wait for a connection, and those shed after waiting.
        self.queued = 0
        self.refused = 0
        # Connections dropped because a sibling proved the coordinator had restarted under them.
        self.dropped_stale = 0
        self.max_head = max_response_head_bytes
        # Event streams hold a connection for as long as a run lasts; they may take at most this
        # many, so the rest stays for the short requests (GET, run start, cancel).
        self.stream_slots = max(1, int(max_connections * stream_share))
        self.streams = 0
        self._stream_waiters: deque[asyncio.Future[_Connection | None]] = deque()

    @property
    def size(self) -> int:
        return len(self._all) + self._connecting

    @property
    def waiting(self) -> int:
        """Requests queued for a connection (or, for an event stream, for a stream slot) right now."""
        return len(self._waiters) + len(self._stream_waiters)

    async def request(self, head: bytes, body: bytes | None, *, deadline: float | None = None,
                      stream: bool = False) -> PoolResponse:
        """Sends one request and returns once the response headers are in.

        `deadline` (event-loop time) bounds the wait for a free connection and for the response
        headers; TimeoutError when it passes (to within `sweep_interval_s`: one periodic sweep
        checks every connection, cheaper than a timer per request). Connecting has its own
        connect timeout. PoolBusy when every connection stayed busy for `queue_timeout_s`.
        `stream`: the answer is an event stream, which first needs one of the `stream_slots`
        (waiting for it as for a connection)."""
        if not self._sweep.started and deadline is not None and not self.closed:
            self._sweep.start(asyncio.get_running_loop())
        if stream:
            if self.streams < self.stream_slots and not self._stream_waiters:
                self.streams += 1
            else:
                await self._queue(self._stream_waiters, deadline, f"all {self.stream_slots} stream slots")
            try:
                conn, reused = await self._acquire(deadline)
            except BaseException:
                self.stream_ended()
                raise
            conn.stream = True
        else:
            conn, reused = await self._acquire(deadline)
        try:
            return await conn.send(head, body, deadline)
        except BaseException as exc:
            if reused and isinstance(exc, ConnectionReset) and not conn.received_any:
                self._drop_idle()
            conn.finish(reusable=False)
            raise

    def idle_connection(self, deadline: float, stream: bool = False) -> _Connection | None:
        """A live idle connection to send on now, or None when the caller has to wait for one
        (an event stream also for a stream slot)."""
        if not self._sweep.started and not self.closed:
            self._sweep.start(asyncio.get_running_loop())
        if stream and (self.streams >= self.stream_slots or self._stream_waiters):
            return None
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                conn.reused = True
                if stream:
                    self.streams += 1
                    conn.stream = True
                return conn
            conn.finish(reusable=False)
        return None

    def stream_ended(self) -> None:
        """A stream slot is free: handed straight to the first waiting stream, so none jumps the queue."""
        while self._stream_waiters:
            waiter = self._stream_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.streams -= 1

    def _drop_idle(self) -> None:
        """A reused connection died before a single response byte: the coordinator most likely
        restarted without this pool noticing, and every connection now idle is older than that
        failure, so as likely dead. Dropped at once, they cannot absorb the retries of a GET one
        after another; the retry opens a fresh connection. Connections busy right now are left
        alone: they either fail on their own or have proven to be alive when they come back."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self.dropped_stale += 1
            conn.finish(reusable=False)

    async def _acquire(self, deadline: float | None) -> tuple[_Connection, bool]:
        """A connection, and whether it has carried a request before."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                return conn, True
            conn.finish(reusable=False)
        if self.size < self._max:
            return await self._connect(), False
        handed = await self._queue(self._waiters, deadline, f"all {self._max} coordinator connections")
        return (handed, True) if handed is not None else (await self._connect(), False)

    async def _queue(self, waiters: deque[asyncio.Future[_Connection | None]], deadline: float | None,
                     what: str) -> _Connection | None:
        """Waits in `waiters` for what they hand over: a connection, or None (a free connection slot;
        in `_stream_waiters`, a stream slot). PoolBusy after `queue_timeout_s`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        waiters.append(waiter)
        self.queued += 1
        busy = False
        if self._queue_timeout is not None:
            limit = loop.time() + self._queue_timeout
            if deadline is None or limit < deadline:
                deadline, busy = limit, True
        timer = loop.call_at(deadline, _expire, waiter) if deadline is not None else None
        try:
            return await waiter
        except TimeoutError:
            if busy:
                self.refused += 1
                raise PoolBusy(f"{what} stayed busy for {self._queue_timeout:g} s") from None
            raise
        except asyncio.CancelledError:
            # What was handed over in the same loop turn as the cancellation must not leak.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()
                if given is not None:
                    self.give_back(given)
                elif waiters is self._stream_waiters:
                    self.stream_ended()
                else:
                    self._wake_one()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in waiters:
                waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                context = self._ssl_context() if self._ssl_context is not None else self._ssl
                _, conn = await loop.create_connection(lambda: _Connection(self), self._host, self._port,
                                                       ssl=context, server_hostname=self._server_name)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"TLS: certificate verify failed: {exc.verify_message or exc.reason}"
            elif isinstance(exc, ssl.SSLError):
                reason = f"TLS: {exc.reason or type(exc).__name__}"
            else:
                reason = "timed out" if isinstance(exc, TimeoutError) else (
                    getattr(exc, "strerror", None) or type(exc).__name__)
            raise ConnectFailed(f"cannot connect to the coordinator: {reason}", sent=False) from None
        finally:
            self._connecting -= 1
        self._all.add(conn)
        return conn

    def give_back(self, conn: _Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            # A slot freed up: let one waiter open a fresh connection.
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _due(self, now: float) -> list[_Connection]:
        # A snapshot: an expired connection is usually closed, and so leaves `_all`, while it expires.
        return [conn for conn in self._all if 0.0 < conn.deadline <= now]

    async def close(self) -> None:
        self._sweep.stop()
        self.closed = True
        for conn in list(self._all):
            conn._abort()
        self._idle.clear()
