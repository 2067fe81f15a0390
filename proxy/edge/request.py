"""The request as the gateway sees it: its parsed head, its body as it arrives, its answer (edge/writer.py).

The connection (edge/protocol.py) fills it in from llhttp's callbacks and
hands it to the gateway once its head is whole; a stage that needs the body
awaits `read_body()` (or takes `body_now()` when it came with the head).

    body = request.body_now() if request.complete else await request.read_body()
    request.respond(answer)
    request.finish()
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from ..arp.answers import Answer
from ..util.certificates import PeerCertificate
from .errors import BodyIncomplete, BodyTooLarge, ClientGone, TrailerTooLarge
from .writer import ResponseWriter

if TYPE_CHECKING:
    from .protocol import ClientConnection

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_IDS = random.Random()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def new_request_id(given: bytes | None) -> str:
    # A client-chosen id is kept for correlation, but only if it is safe to log and echo.
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    # Correlation ids need uniqueness, not secrecy: no urandom syscall per request. A generator of
    # our own, seeded from the OS once: whoever calls random.seed() cannot make ids repeat.
    return _IDS.getrandbits(128).to_bytes(16, "big").hex()  # "%032x", without formatting


def broken_error(reason: str) -> BodyIncomplete:
    """What reading a body that broke (`Request.broken`) ends in."""
    return TrailerTooLarge() if reason == "trailer_too_large" else BodyIncomplete(reason)


# What `Request.body_later` calls: with None once the body is whole, else with why it will not be.
BodyCallback = Callable[["Request", BaseException | None], None]


class Handling(Protocol):
    """What a handler keeps per request; the request only carries it for the handler."""

    def abandoned(self, status: int) -> object:
        """The request ended without `finish()` (see `Handler.abandoned`); what it returns is not read."""


class Request(ResponseWriter):
    """One client request as the gateway sees it: the parsed head, the body as it arrives, and
    the calls that answer it on its connection."""

    # status, bytes_out, head_sent, will_close and _chunked_out are the writer's slots (edge/writer.py).
    __slots__ = ("conn", "method", "target", "path", "version", "headers", "authorization", "content_type",
                 "content_encoding", "content_length", "chunked", "expect_continue", "host", "hosts",
                 "preflight", "keep_alive", "refusal", "request_id", "complete", "too_large", "broken", "_body",
                 "body_size", "_held", "_waiter", "_given_id", "_ids", "upstream_s",
                 "finished", "aborter", "exchange", "client", "user_agent", "upstream_start", "_then", "traceparent")

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
        self.body_size = 0                              # body bytes received so far
        self._held = 0                                  # bytes this request counts against the budget
        self._waiter: asyncio.Future[None] | None = None
        self._then: BodyCallback | None = None          # called once the body arrives (body_later)
        self._given_id: bytes | None = None
        self._ids = 0
        # What the access log learns.
        self.status = 0
        self.bytes_out = 0
        self.upstream_s: float | None = None            # until the coordinator's headers; None: it never answered
        self.upstream_start = 0.0
        self.user_agent: bytes | None = None
        self.traceparent: bytes | None = None           # the first traceparent field, for binding and audit
        self.client = ""                                # set when a trusted proxy names the client; else the peer
        self.head_sent = False
        self.will_close = False
        self._chunked_out = False
        # Kept by the gateway while it answers.
        self.finished = False                           # the answer is written and observed
        self.aborter: Callable[[], None] | None = None  # stops work in flight outside a task if the client leaves
        self.exchange: Handling | None = None           # the handler's own state for this request

    @property
    def client_certificate(self) -> PeerCertificate | None:
        """The client certificate of the connection (TLS with client_auth optional or required)."""
        return self.conn.peer_certificate

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    # -- the body

    async def read_body(self) -> bytes:
        """The whole body, once it has arrived. Sends `100 Continue` first when the client waits
        for it. BodyTooLarge, BodyTimeout, BodyIncomplete (TrailerTooLarge), Overloaded or ClientGone
        otherwise."""
        if self.broken:
            raise broken_error(self.broken)
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

    def body_later(self, then: BodyCallback) -> bool:
        """Calls `then(request, None)` once the whole body has arrived, or `then(request, error)` with
        what `read_body` would raise: no task and no future, for a stage that only waits for the
        body. The connection calls it after the read that completes the body is parsed, never from
        inside llhttp. False, and nothing is called, when the client is already gone (its
        connection reports that)."""
        conn = self.conn
        if conn.closed:
            return False
        if self.expect_continue and self.version == b"1.1":
            self.expect_continue = False
            conn.transport.write(_CONTINUE)
        self._then = then
        conn.wait_for_body()
        return True

    def body_now(self) -> bytes:
        """The whole body of a complete request (BodyTooLarge past limits.max_body_bytes)."""
        if self.too_large:
            raise BodyTooLarge()
        body = self._body
        if body.__class__ is bytearray:
            body = self._body = bytes(body)
        return body  # type: ignore[return-value]

    def _feed(self, chunk: bytes, limit: int) -> bool:
        self.body_size += len(chunk)
        if self.body_size > limit:
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
        self._wake(broken_error(reason))

    def _wake(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        elif self._then is not None:
            self.conn.body_came(self, error)

    # -- its life on the connection

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Continues answering in a task: for the stages that have to wait."""
        self.conn.spawn(self, work)

    def finish(self) -> None:
        """The answer is complete: the connection moves on to the next request, or closes."""
        self.finished = True
        self.conn.finished(self)
