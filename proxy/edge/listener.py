"""The public port: accepts client connections within the cap, and keeps their deadlines.

The edge in modules, one job each:
- `protocol.py`: one asyncio protocol per client connection, llhttp's callbacks,
  framing, the target, head limits and refusals, pipelined requests answered in order;
- `request.py`: the `Request` the gateway stages see, and its body as it arrives;
- `writer.py`: the answer on the wire (heads, Date, whole, streamed);
- `flow.py`: reading paused and resumed, write pause and drain, the send deadline;
- `budget.py`: the process-wide buffered-bytes budget (`limits.max_buffered_bytes`);
- `sweep.py`: the periodic deadline sweep, shared with the coordinator pool;
- `handshake.py`: a TLS connection before its handshake is done, holding its slot;
- here: the connection cap (idle connections are reclaimed, oldest first, before a
  new client is turned away; a connection counts against the cap from accept, through
  its TLS handshake, until its socket is gone), the file-descriptor limit, the budget's
  hold on every connection, the sweep of every connection's deadlines, and shutdown.

    listener = Listener(gateway, limits, metrics)
    url = await listener.start("127.0.0.1", 8080)
    ...
    await listener.close(grace_s=25)

Connections read time from `clock` (the loop's by default), so a test can drive
a connection through a fake transport and move time itself:

    listener = Listener(handler, limits, clock=lambda: now)
    listener.bind(asyncio.get_running_loop())
    conn = listener.connection(); conn.connection_made(transport)
    listener.sweep.run(now)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .budget import Budget
from .handshake import TlsHandshake, ssl_protocol_class
from .protocol import ClientConnection, Phase
from .request import Request
from .sweep import DeadlineSweep
from .tls import ServerTls

log = logging.getLogger("proxy.edge.listener")


# Sockets the process needs besides client connections: the coordinator pool is added on top.
FD_HEADROOM = 64
LIMIT_LOG_INTERVAL_S = 10.0
# What one connection is assumed to need at least: the budget admits no more connections than
# could each hold a small head in it.
CONNECTION_BYTES = 4096


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

    def __init__(self, handler: Handler, limits: EdgeLimits, metrics: object | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by bind()
        self._given_clock = clock
        self.clock: Callable[[], float] = clock  # type: ignore[assignment]  # the loop's time unless given; bind()
        self.connections: dict[ClientConnection, None] = {}  # insertion order: oldest first
        self._server: asyncio.AbstractServer | None = None
        self.sweep = DeadlineSweep("listener", limits.sweep_interval_s, due=self._due, expire=_expire, clock=clock)
        self._last_warning = -LIMIT_LOG_INTERVAL_S
        self._last_overload_warning = -LIMIT_LOG_INTERVAL_S
        self._probe_fd = -1
        self._all_closed: asyncio.Event | None = None
        self.budget = Budget(limits.max_buffered_bytes, self._hold_all, self._release_all)
        # Set by start() with TLS on and client certificates asked for: each connection then reads
        # its peer's certificate once, after the handshake; off, connections read nothing.
        self.client_certificates = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ties the listener to `loop` without opening a port (start() does this first)."""
        self.loop = loop
        self.clock = self._given_clock or loop.time

    def connection(self) -> ClientConnection:
        """A new connection's protocol: the factory the server is given."""
        return ClientConnection(self)

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024,
                    tls: ServerTls | None = None) -> str:
        loop = asyncio.get_running_loop()
        self.bind(loop)
        if tls is None:
            self._server = await loop.create_server(self.connection, host, port,
                                                    reuse_port=reuse_port or None, backlog=backlog)
        else:
            # The handshake counts against the header timeout: a client that stalls it is cut like one
            # that stalls its head, by the same sweep.
            # A plain server: each accepted socket takes its slot under the cap before its handshake
            # (edge/handshake.py), which asyncio's `ssl=` would hide until the handshake is done.
            self.client_certificates = tls.context.verify_mode != ssl.CERT_NONE
            ssl_protocol = ssl_protocol_class(loop)
            self._server = await loop.create_server(lambda: TlsHandshake(self, tls, ssl_protocol), host, port,
                                                    reuse_port=reuse_port or None, backlog=backlog)
        self._watch_accept_errors()
        # libuv meets EMFILE on accept() by accepting and closing the connection itself, unseen by
        # the exception handler: under uvloop each sweep pass probes for a full descriptor table.
        self._probe_fd = self._server.sockets[0].fileno() if type(loop).__module__.startswith("uvloop") else -1
        self.sweep.start(loop)
        sock = self._server.sockets[0]
        addr, bound = sock.getsockname()[:2]
        scheme = "http" if tls is None else "https"
        return f"{scheme}://{'[' + addr + ']' if ':' in addr else addr}:{bound}"

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
        now = self.clock()
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
        now = self.clock()
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
        self.sweep.stop()
        if self._server is not None:
            await self._server.wait_closed()
