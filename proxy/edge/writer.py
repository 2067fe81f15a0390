"""The response writer: how an answer to a client request goes on the wire.

One head per answer (status line, X-Request-ID, Connection, Date), then the
body whole (`respond`, `relay_whole`) or in pieces (`start_stream`, `send`,
`end_stream`): with a Content-Length, chunked, or delimited by closing the
connection. `Request` (edge/request.py) answers through these methods; they are
a base class of it rather than an object of their own, so answering costs no
extra object or call per request.

    request.respond(error_answer(404, "not_found", "No such route", request_id=request.request_id))
    request.start_stream(200, b"OK", header_block, dated, None)
    await request.send(b"data: 1\n\n")
    request.end_stream()
"""

from __future__ import annotations

import time
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus
from typing import TYPE_CHECKING

from ..arp.answers import Answer
from .errors import ClientGone

if TYPE_CHECKING:
    from .protocol import ClientConnection


# The status line's " 200 " for every valid code, made once: formatting it per answer costs more than a lookup.
_STATUS_CODES = {code: b" %d " % code for code in range(100, 600)}


@lru_cache(maxsize=1)
def http_date(second: int) -> bytes:
    """An RFC 9110 Date header line for this second: formatted once, whatever the request rate."""
    return b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"


@lru_cache(maxsize=128)
def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class ResponseWriter:
    """The answer half of a Request: writes its head and body on the request's connection."""

    # What the answer has said so far (the access log reads status and bytes_out); set by Request.__init__.
    __slots__ = ("status", "bytes_out", "head_sent", "will_close", "_chunked_out")

    # The request's, read here.
    conn: ClientConnection
    method: str
    version: bytes
    keep_alive: bool
    complete: bool
    request_id: str
    status: int
    bytes_out: int
    head_sent: bool
    will_close: bool
    _chunked_out: bool

    def _head(self, status: int, reason: bytes, length: int | None) -> list[bytes]:
        conn = self.conn
        self.will_close = close = (not self.keep_alive or not self.complete or conn.closing
                                   or (length is None and self.version == b"1.0"))
        self.head_sent = True
        self.status = status
        parts = [b"HTTP/", self.version, _STATUS_CODES[status] if 100 <= status <= 599 else b" %d " % status, reason,
                 b"\r\nX-Request-ID: ",
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
        parts = self._head(answer.status, reason_phrase(answer.status), len(body))
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
