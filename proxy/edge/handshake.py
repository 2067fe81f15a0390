"""A TLS connection before its handshake is done: it holds its slot under the connection cap from accept.

asyncio (and uvloop) servers given `ssl=` hide a connection from the application until its
handshake completes: the protocol the factory makes sees nothing before, and nothing at all when
the handshake never completes. A client could then hold any number of sockets in stalled
handshakes, bounded only by the file-descriptor limit. So the listener's TLS server is a plain
one whose factory makes a `TlsHandshake`: the raw socket's protocol, which takes a slot at accept
(refused beyond `listen.max_connections`, like a plain connection), carries the loop's own
`SSLProtocol` inside it, keeps the header deadline (the listener's sweep cuts it), and counts a
handshake that ends without completing (`timeout`, `client_closed`; OpenSSL's refusals are counted
where they happen, edge/tls.py). Once the handshake is done it hands its slot to the connection
and steps aside: the socket then talks to the `SSLProtocol` directly, at no cost per read.

A handshake in progress is not reclaimable: the cap would otherwise let a client cycle its stalled
handshakes through the slots of each other forever.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from .protocol import ClientConnection, Phase
from .tls import ServerTls

if TYPE_CHECKING:
    from .listener import Listener


def ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol: uvloop's compiled one under uvloop, asyncio's otherwise."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop
        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # not in its stubs
    import asyncio.sslproto
    return asyncio.sslproto.SSLProtocol


class TlsHandshake(asyncio.BufferedProtocol):
    """The raw socket of one TLS connection until its handshake is done (the protocol factory's product)."""

    # What the listener reads of every entry in its connection table.
    phase = Phase.HEAD
    reclaimable = False
    send_deadline = 0.0

    def __init__(self, listener: Listener, tls: ServerTls, ssl_protocol: Any) -> None:
        self.listener = listener
        self.tls = tls
        self.conn = listener.connection()
        self.conn.handshake = self
        # asyncio's own handshake timeout stays as a backstop behind the listener's sweep, which cuts first.
        timeout = 2 * listener.limits.header_timeout_s
        self.inner = ssl_protocol(listener.loop, self.conn, tls.context, None, server_side=True,
                                  ssl_handshake_timeout=timeout)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.deadline = 0.0
        self.closed = False    # refused at accept, cut, or shut down: nothing more to count
        self.started = False   # the SSLProtocol has the socket
        self.done = False      # handshake complete: the connection holds the slot now

    # -- asyncio.BufferedProtocol: delegated to the SSLProtocol until the handshake is done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.deadline = self.listener.clock() + self.listener.limits.header_timeout_s
        self.listener.admit(self)  # type: ignore[arg-type]  # duck-typed entry of the connection table
        if self.closed:
            return
        self.started = True
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> Any:
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        if not self.started:
            return False
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        if self.started:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.started:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)  # type: ignore[arg-type]
        if not self.done and not self.closed:
            self.closed = True
            # OpenSSL's refusals arrive as the SSLError that failed the handshake, counted already;
            # asyncio's own timeout (the backstop) as ConnectionAbortedError.
            if not isinstance(exc, ssl.SSLError):
                self.tls.abandoned("timeout" if isinstance(exc, ConnectionAbortedError) else "client_closed")
        if self.started:
            self.inner.connection_lost(exc)

    # -- the handshake's end

    def completed(self, conn: ClientConnection) -> None:
        """The handshake is done (`conn.connection_made`): the slot passes to `conn`, which the listener
        admits next, and the socket talks to the SSLProtocol directly from its next read on."""
        self.done = True
        self.deadline = 0.0
        self.listener.forget(self)  # type: ignore[arg-type]
        self.transport.set_protocol(self.inner)

    # -- what the listener asks of every entry in its connection table

    def expire(self) -> None:
        """The header timeout passed with the handshake unfinished."""
        self.deadline = 0.0
        if self.closed:
            return
        self.closed = True
        self.tls.abandoned("timeout")
        self.listener.closed_for("header_timeout")
        self.transport.abort()

    def send_expired(self) -> None:  # nothing is sent before the handshake but by OpenSSL
        self.expire()

    def close_now(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.deadline = 0.0
            self.transport.abort()

    def shut_down(self) -> None:
        self.abort()

    def hold_reading(self) -> None:
        """The budget counts HTTP bytes; a handshake holds none (OpenSSL bounds its records)."""

    def release_reading(self) -> None:
        """See hold_reading."""
