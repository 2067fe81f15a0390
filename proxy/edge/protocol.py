"""One client connection: the asyncio protocol, llhttp's callbacks, and answering requests in order.

Everything the edge decides about bytes happens here, before any gateway
stage sees a request:
- framing: llhttp parses in its strict mode and bodies are buffered whole (up
  to `limits.max_body_bytes`), so whatever reaches the coordinator is framed by
  the gateway alone; nothing is ever decompressed;
- the target: origin-form, RFC 3986 characters only (absolute-form is routed on its path);
- the head's size and line count (llhttp has no limit of its own), and the
  header, body and keep-alive timeouts: each connection keeps one deadline,
  which the listener's sweep checks (edge/sweep.py);
- memory: every head and body byte held counts against one process-wide budget
  (edge/budget.py); a head or body still starved of it when its timeout passes
  gets 503 `overloaded`;
- order: pipelined requests are answered strictly one after another;
- reading and writing follow the client and the budget (edge/flow.py).

A request refused here still reaches the gateway, carrying its `refusal`, so
it gets an ErrorEnvelope, an access-log line and a count like any other.

    conn = listener.connection()     # the protocol factory given to create_server
    conn.connection_made(transport)  # then data_received, eof_received, connection_lost
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Coroutine
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import httptools

from ..arp.answers import Answer, error_answer
from ..util.certificates import PeerCertificate, peer_certificate
from .errors import BodyTimeout, ClientGone, Overloaded
from .flow import FlowControl
from .request import Request, new_request_id

if TYPE_CHECKING:
    from .handshake import TlsHandshake
    from .listener import Listener

# The name operators already filter on: the connection's log lines were the listener's before the split.
log = logging.getLogger("proxy.edge.listener")

# Pipelined requests parsed ahead of the one being answered; past it the rest of the read is held
# unparsed and reading pauses until the queue has room again.
MAX_PIPELINED = 16
# A request head ends in two line feeds (an optional CR between them), or in one at the start of a
# read when the head's end straddles two reads: splitting a read at these bounds the requests it queues.
_HEAD_END = re.compile(rb"\n\r?\n|^\r?\n")
# llhttp (strict) ends every head in CRLF CRLF, so a read with k of them completes at most k + 1 heads
# (one may have begun in the read before): a cheaper bound than splitting it, enough for most reads.
_CRLF2 = b"\r\n\r\n"
# RFC 3986 origin-form: "/" path characters (unreserved, sub-delims, ":", "@", "/", "%") and a
# query that may also hold "?". Removing these must leave nothing.
_TARGET_CHARS = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                 b"-._~!$&'()*+,;=:@/%?")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# A well-formed request line: an unknown method in it is 501, anything else the parser refuses is 400.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")
_HOST_CHARS = _TARGET_CHARS.replace(b"/", b"").replace(b"?", b"") + b"[]"
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
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


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing with this answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def valid_target(target: bytes) -> bool:
    return (target[:1] == b"/" and not target.translate(None, _TARGET_CHARS)
            and (b"%" not in target or _BAD_ESCAPE.search(target) is None))


class ClientConnection(FlowControl, asyncio.Protocol):
    """One client connection: parses requests as they arrive and answers them in order."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self._clock = listener.clock
        self._limits = listener.limits
        self._handler = listener.handler.handle
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.peer = ""
        self.peer_certificate: PeerCertificate | None = None  # the client's, with client certificates asked for
        self.handshake: TlsHandshake | None = None  # over TLS: holds this connection's slot until connection_made
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
        self._feeding = False       # inside llhttp: a body's arrival is acted on once the read is parsed
        self._came: Request | None = None  # the current request's body arrived (or failed) in this read
        self._came_error: BaseException | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        if self.listener.client_certificates:
            self.peer_certificate = peer_certificate(transport.get_extra_info("ssl_object"))
        self.deadline = self._clock() + self._limits.header_timeout_s
        if self.handshake is not None:
            self.handshake.completed(self)
        self.listener.admit(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.deadline = self._clock() + self._limits.header_timeout_s
        if self._held:
            data = self._unhold() + data  # parsed in the order it came
        if data.count(_CRLF2) < MAX_PIPELINED - len(self._queue) - 1:
            self._feed(data)  # cannot complete more heads than there is room for
        else:
            self._parse(data)
        if self._came is not None:
            self._body_arrived()
        if self._current is None and self._queue and not self.closed:
            # Begun after the whole read is parsed, never from inside llhttp: a request whose body
            # came in the same read is complete by now.
            self._begin(self._queue.popleft())

    def _hold(self, data: bytes) -> None:
        """Keeps what the full pipeline queue cannot take yet; it counts against the budget like a
        head or a body, since every connection may hold one read of it."""
        self._held = data
        self._budget.take(len(data))

    def _unhold(self) -> bytes:
        held, self._held = self._held, b""
        if held:
            self._budget.give(len(held))
        return held

    def _parse(self, data: bytes) -> None:
        """Parses as much of `data` as the pipelining queue has room for; holds the rest."""
        start = 0
        while start < len(data) and not self._stopped and not self.closed:
            room = MAX_PIPELINED - len(self._queue)
            if room <= 0:
                self._hold(data[start:])
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
        self._feeding = True
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
        self._feeding = False

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
        self._unhold()
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
        self._head_bytes = size = self._head_bytes + len(name) + len(value) + 4
        if not self._in_head:
            # Trailer fields of a chunked body: never headers of the request, but counted with them.
            self._trailers += 1
            if (size > self._limits.max_header_bytes or self._trailers + len(request.headers)
                    + len(request.authorization) > self._limits.max_headers):
                raise _Refused(431, "trailer_too_large", "The request trailer section is too large")
            return
        if size > self._limits.max_header_bytes:
            raise _Refused(431, "header_too_large", "The request head is too large")
        noted = _NOTED.get(name.lower())
        if noted is None:
            request.headers.append((name, value))
            return
        if noted == _AUTHORIZATION:
            request.authorization.append(value)
            return  # kept out of `headers`, so no header cache ever holds a token
        request.headers.append((name, value))
        if noted == _HOST:
            request.host = value
            request.hosts += 1
        elif noted == _CONTENT_TYPE:
            request.content_type = value
        elif noted == _CONTENT_LENGTH:
            request.content_length = int(value)  # llhttp has checked it: digits, and only one
        elif noted == _USER_AGENT:
            request.user_agent = value
        elif noted == _TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":
                # Other codings would have to be undone before the body means anything; the edge undoes none.
                raise _Refused(501, "unsupported_transfer_coding", "Only the chunked transfer coding is accepted")
            request.chunked = True
        elif noted == _CONTENT_ENCODING:
            request.content_encoding = value
        elif noted == _REQUEST_ID:
            request._given_id = value
            request._ids += 1
        elif noted == _EXPECT:
            request.expect_continue = value.lower() == b"100-continue"
        elif noted == _TRACEPARENT:
            if request.traceparent is None:
                request.traceparent = value
        else:
            request.preflight = True  # Access-Control-Request-Method

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._in_head = False
        # What the request keeps of its head (target and header lines) is held until it ends.
        if self._head_charge:
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
                if self._budget_held:
                    self._apply_reading()  # the reservation itself filled the budget and held this connection
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
            elif (request.chunked or length) and parser.should_upgrade():
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
        awaiting = self._awaiting_room
        if self._reserved_body or awaiting:
            # Done with this body's reservation; one that waited got its bytes charged as they came.
            if awaiting:
                self._awaiting_room = False
                self._budget.forget(self)
            self._reserved_body = False
            if self._budget_held or awaiting:  # else reading was, and stays, what _reading says
                self._apply_reading()
        if request._waiter is not None or request._then is not None:
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
        held = request._held
        if held:
            request._held = 0
            self._budget.give(held)
        if request is not self._current or self.closed:
            return
        if request.will_close or self.closing or (self._eof and not self._queue and not self._held):
            self.close()
        elif self.write_paused:
            self._advance_when_drained = True  # the client is slow to take large answers: wait for it
        elif self._queue or self._held or self._advancing:
            self._advance()
        else:
            self._rest()

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
            self._parse(self._unhold())
        if self._queue:
            self._begin(self._queue.popleft())
            return
        self._rest()

    def _rest(self) -> None:
        """Nothing left to answer: idle until the next request (or closed, if none may come)."""
        self._current = None
        if self._stopped:
            self.close()
            return
        if not self._reading:
            self._resume_reading()
        if self._in_head:
            self.phase = Phase.HEAD
            self.deadline = self._clock() + self._limits.header_timeout_s
        else:
            self.phase = Phase.IDLE
            self.deadline = self._clock() + self._limits.keepalive_timeout_s

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
        self.deadline = self._clock() + self._limits.body_timeout_s
        self._resume_reading()

    def body_done(self) -> None:
        self.phase = Phase.BUSY
        self.deadline = 0.0

    def body_came(self, request: Request, error: BaseException | None) -> None:
        """The body a `Request.body_later` waits for arrived or failed: its callback runs now, or,
        from inside llhttp, once the read is parsed (so the request goes on with the parser idle)."""
        if self._feeding:
            if self._came is None:
                self._came, self._came_error = request, error
            return
        self._continue(request, error)

    def _body_arrived(self) -> None:
        request, error = self._came, self._came_error
        self._came = self._came_error = None
        assert request is not None
        self._continue(request, error)

    def _continue(self, request: Request, error: BaseException | None) -> None:
        then, request._then = request._then, None
        if then is None:
            return  # woken before: the body's outcome is only acted on once
        self.body_done()
        try:
            then(request, error)
        except Exception:
            self._internal_error(request)

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

    @property
    def reclaimable(self) -> bool:
        return not self.closed and (self.phase is Phase.IDLE or (self.phase is Phase.HEAD and self._current is None))

    # -- closing
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
                self.send_deadline = self._clock() + self._limits.send_timeout_s

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
        self.deadline = self._clock() + LINGER_S
        if self.send_deadline == 0.0 and self.unsent():
            self.send_deadline = self._clock() + self._limits.send_timeout_s
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


# The header fields the edge reads itself, each to one small int for on_header to branch on,
# in the order on_header tests them: the most common first.
(_AUTHORIZATION, _HOST, _CONTENT_TYPE, _CONTENT_LENGTH, _USER_AGENT, _TRANSFER_ENCODING, _CONTENT_ENCODING,
 _REQUEST_ID, _EXPECT, _TRACEPARENT, _PREFLIGHT) = range(11)
_NOTED = {b"authorization": _AUTHORIZATION, b"host": _HOST, b"content-type": _CONTENT_TYPE,
          b"content-length": _CONTENT_LENGTH, b"user-agent": _USER_AGENT, b"transfer-encoding": _TRANSFER_ENCODING,
          b"content-encoding": _CONTENT_ENCODING, b"x-request-id": _REQUEST_ID, b"expect": _EXPECT,
          b"traceparent": _TRACEPARENT, b"access-control-request-method": _PREFLIGHT}


def _bad(request: Request, reason: str, message: str) -> Answer:
    return error_answer(400, "invalid_request", message, request_id=request.request_id,
                        details={"reason": reason})
