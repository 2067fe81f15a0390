"""Forwarding to the Run Coordinator: header hygiene, retries, timeouts, streaming back.

    upstream = Upstream(cfg.upstream, metrics, strip_prefix="X-Auth-")
    await upstream.start()
    upstream.forward(request, route, body, header_lines, done)    # answers `request`, then done(request, 0)

Requests go out on the keep-alive pool of `pool.py`, framed by the gateway
alone: the listener has the whole body, so it goes with its exact
Content-Length, never with the client's framing. Headers are the raw bytes
the client sent minus hop-by-hop ones and every name that could be read as an
identity header, compared after folding `_` to `-` and case, as CGI-style
stacks do. Each chunk the coordinator sends is written to the client as soon
as it arrives, so NDJSON events are never held back. Streams have connect,
header and idle timeouts but no total timeout: an event stream may
legitimately stay open for hours.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from .answers import error_answer
from .backoff import full_jitter
from .config import UpstreamConfig
from .listener import ClientGone, Request
from .metrics import GatewayMetrics
from .pool import ConnectFailed, PoolBusy, PoolResponse, UpstreamError, UpstreamPool
from .routes import Route

log = logging.getLogger("proxy.forwarding")

# RFC 9110 section 7.6.1 plus the legacy names proxies still meet in the wild.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Set by the gateway itself, never copied from the client.
_REPLACED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                       b"x-request-id", b"expect", b"authorization", b"content-length"})
_RETRYABLE_STATUSES = frozenset({502, 503, 504})
CLIENT_HEADER_CACHE = 1024
# X-Request-ID is the gateway's, and this hop frames the body itself.
_REFRAMED = HOP_BY_HOP | {b"x-request-id", b"content-length"}
RESPONSE_HEADER_CACHE = 256


# Called once a request's answer is written (or the client has left: failed 499).
Done = Callable[[Request, int], None]


def fold(name: bytes) -> bytes:
    """A header name as CGI/WSGI stacks read it: `X_Auth_Subject` and `x-auth-subject` are one name."""
    return name.lower().replace(b"_", b"-")


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    status: int
    code: str
    message: str
    kind: str            # connect, timeout, reset, protocol: the metrics label
    retryable: bool


def classify(exc: BaseException, *, idempotent: bool) -> UpstreamFailure:
    """Maps a failed exchange to the ErrorEnvelope the caller sees."""
    if isinstance(exc, ConnectFailed):
        return UpstreamFailure(502, "run_coordinator_unavailable",
                               "The Run Coordinator could not be reached", "connect", True)
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(504, "run_coordinator_timeout",
                               "The Run Coordinator did not answer in time", "timeout", idempotent)
    if isinstance(exc, UpstreamError) and exc.kind == "reset":
        return UpstreamFailure(502, "run_coordinator_unavailable",
                               "The Run Coordinator closed the connection", "reset", idempotent)
    return UpstreamFailure(502, "run_coordinator_bad_response",
                           "The Run Coordinator sent an invalid response", "protocol", False)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any `Connection` line (RFC 9110 7.6.1: they are hop-by-hop too)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(fold(t.strip()) for t in value.split(b","))
    return frozenset(named)


def end_to_end(raw: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The coordinator's headers minus `drop` and any named on its Connection lines."""
    named = connection_tokens(raw) if any(n.lower() == b"connection" for n, _ in raw) else frozenset()
    return [(name, value) for name, value in raw if (low := name.lower()) not in drop and low not in named]


def response_header_block(raw: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> tuple[bytes, bool]:
    """The coordinator's header lines as this hop relays them, and whether the coordinator sent a Date."""
    kept = end_to_end(raw, drop)
    return b"".join(b"%s: %s\r\n" % pair for pair in kept), any(name.lower() == b"date" for name, _ in raw)


class Upstream:
    def __init__(self, cfg: UpstreamConfig, metrics: GatewayMetrics | None = None, *,
                 strip_prefix: str = "", strip_names: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.base_url = cfg.url
        self.metrics = metrics
        self._strip_prefix = fold(strip_prefix.encode()) or None
        self._drop = HOP_BY_HOP | _REPLACED | {fold(n.encode()) for n in strip_names}
        self.pool: UpstreamPool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start(), inside the running loop
        self._client_blocks: dict[tuple[tuple[tuple[bytes, bytes], ...], str, bytes | None], bytes] = {}
        self._response_blocks: dict[tuple[tuple[bytes, bytes], ...], tuple[bytes, bool]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        """aiohttp's client for control-plane calls to the coordinator (the health probe)."""
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # once: on Python 3.11 each lookup is a getpid() call
        self._session = aiohttp.ClientSession(auto_decompress=False)
        if self.base_url is not None:
            self.pool = UpstreamPool(self.base_url, max_connections=self.cfg.max_connections,
                                     connect_timeout_s=self.cfg.connect_timeout_s,
                                     idle_timeout_s=self.cfg.keepalive_idle_s,
                                     sweep_interval_s=min(1.0, self.cfg.request_timeout_s / 10),
                                     queue_timeout_s=self.cfg.queue_timeout_s)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self._session is not None:
            await self._session.close()

    def _head(self, request: Request, pool: UpstreamPool, extra: bytes, framing: bytes) -> bytes:
        return b"".join((request.method.encode(), b" ", pool.base_path, request.target, b" HTTP/1.1\r\nHost: ",
                         pool.host_header, b"\r\n", self._client_headers(request), b"X-Request-ID: ",
                         request.request_id.encode(), b"\r\n", extra, framing, b"\r\n"))

    def _client_headers(self, request: Request) -> bytes:
        """The client's headers as the coordinator gets them, cached by their exact bytes and the peer:
        a keep-alive client sends the same headers request after request. The key holds no token:
        the listener keeps Authorization out of `request.headers`."""
        key = (tuple(request.headers), request.conn.peer, request.host)
        block = self._client_blocks.get(key)
        if block is None:
            block = self._filter_client_headers(request)
            if len(self._client_blocks) >= CLIENT_HEADER_CACHE:
                self._client_blocks.clear()
            self._client_blocks[key] = block
        return block

    def _filter_client_headers(self, request: Request) -> bytes:
        raw = request.headers
        drop = self._drop | connection_tokens(raw)
        prefix = self._strip_prefix
        prior: list[bytes] = []
        parts: list[bytes] = []
        for name, value in raw:
            low = fold(name)
            if low in drop or (prefix is not None and low.startswith(prefix)):
                if low == b"x-forwarded-for":
                    prior.append(value)
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += (b"X-Forwarded-For: ", b", ".join([*prior, request.conn.peer.encode()]),
                  b"\r\nX-Forwarded-Proto: http\r\n")
        if request.host is not None:
            parts += (b"X-Forwarded-Host: ", request.host, b"\r\n")
        return b"".join(parts)

    def _response_block(self, raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
        """Cached by the exact header bytes: a coordinator repeats its headers answer after answer,
        only its Date moving once a second."""
        key = tuple(raw)
        block = self._response_blocks.get(key)
        if block is None:
            block = response_header_block(raw, _REFRAMED)
            if len(self._response_blocks) >= RESPONSE_HEADER_CACHE:
                self._response_blocks.clear()
            self._response_blocks[key] = block
        return block

    def forward(self, request: Request, route: Route, body: bytes | None, extra: bytes, done: Done) -> None:
        """Sends the request (its whole body, if any) and answers the client with what the coordinator
        says; calls `done(request, failed)` once the answer is written.

        The usual exchange runs on callbacks alone: an idle pooled connection, one write, and the
        answer relayed from the coordinator connection's own read. Waiting for a connection,
        retries and streamed bodies continue in a task."""
        pool = self.pool
        if pool is None:
            request.respond(error_answer(
                503, "run_coordinator_missing",
                "No Run Coordinator is configured: set upstream.url or JARVIS_RUN_COORDINATOR_URL",
                request_id=request.request_id, retryable=False))
            done(request, 0)
            return
        if body is not None:
            framing = b"Content-Length: %d\r\n" % len(body)
        else:
            framing = b"Content-Length: 0\r\n" if request.method == "POST" else b""
        head = self._head(request, pool, extra, framing)
        deadline = self._loop.time() + self.cfg.request_timeout_s
        request.upstream_s = time.perf_counter()  # the start, until the headers are in
        conn = pool.idle_connection(deadline)
        if conn is None:
            request.spawn(self._exchange(request, route, head, body, deadline, done, 1))
            return

        def on_headers(response: PoolResponse | None, error: UpstreamError | TimeoutError | None) -> None:
            request.aborter = None
            if response is None:
                conn.finish(reusable=False)
                assert error is not None
                if self._retryable(request, error, 1):
                    request.spawn(self._exchange(request, route, head, body, deadline, done, 2))
                else:
                    self._refuse(request, error)
                    done(request, 0)
            elif self._retry_status(request, response, 1):
                response.release()
                request.spawn(self._exchange(request, route, head, body, deadline, done, 2))
            else:
                self._answer(request, route, response, done)

        def abandon() -> None:  # the client left first
            conn.finish(reusable=False)
            done(request, 499)

        request.aborter = abandon
        conn.start(head, body, deadline, on_headers)

    async def _exchange(self, request: Request, route: Route, head: bytes, body: bytes | None, deadline: float,
                        done: Done, attempt: int) -> None:
        """The same exchange, for when it has to wait: for a pool connection, or between retries."""
        pool = self.pool
        assert pool is not None
        if attempt > 1:
            if self.metrics is not None:
                self.metrics.retried(route.template)
            if not await self._pause(attempt - 1, deadline):
                self._refuse(request, TimeoutError())
                done(request, 0)
                return
        try:
            upstream = await self._send(pool, route, head, body, request.method == "GET", deadline, attempt)
        except (UpstreamError, TimeoutError) as exc:
            self._refuse(request, exc)
            done(request, 0)
            return
        self._answer(request, route, upstream, done)

    def _retryable(self, request: Request, error: UpstreamError | TimeoutError, attempt: int) -> bool:
        """A refused connection is retried for any method (the request never left); a reset only
        for GET, so a run is never started twice."""
        return (attempt < self.cfg.retries.attempts and isinstance(error, UpstreamError)
                and not isinstance(error, PoolBusy) and (request.method == "GET" or not error.sent))

    def _retry_status(self, request: Request, response: PoolResponse, attempt: int) -> bool:
        return (request.method == "GET" and response.status in _RETRYABLE_STATUSES
                and attempt < self.cfg.retries.attempts)

    async def _pause(self, retry: int, deadline: float) -> bool:
        """Full-jitter exponential backoff before retry number `retry`; False if it would pass the deadline."""
        retries = self.cfg.retries
        pause = full_jitter(retry, retries.backoff_initial_s, retries.backoff_max_s)
        if self._loop.time() + pause >= deadline:
            return False
        await asyncio.sleep(pause)
        return True

    def _refuse(self, request: Request, exc: BaseException) -> None:
        """The ErrorEnvelope for an exchange that failed before the coordinator answered."""
        if isinstance(exc, PoolBusy):
            # Every coordinator connection stayed busy for queue_timeout_s: shed instead of queueing
            # without bound. The request never left, so any method may be retried by the client.
            request.respond(error_answer(
                503, "run_coordinator_busy", "The Run Coordinator is at capacity; retry shortly",
                request_id=request.request_id, retryable=True,
                details={"max_connections": self.cfg.max_connections},
                headers={"Retry-After": str(max(1, math.ceil(self.cfg.queue_timeout_s)))}))
            return
        failure = classify(exc, idempotent=request.method == "GET")
        if self.metrics is not None:
            self.metrics.upstream_failed(failure.kind)
        log.warning("upstream request failed", extra={"event": "upstream_error", "kind": failure.kind,
                                                      "error": str(exc) or type(exc).__name__,
                                                      "request_id": request.request_id})
        request.respond(error_answer(failure.status, failure.code, failure.message,
                                     request_id=request.request_id, retryable=failure.retryable))

    def _answer(self, request: Request, route: Route, upstream: PoolResponse, done: Done) -> None:
        request.upstream_s = upstream_s = time.perf_counter() - (request.upstream_s or 0.0)
        if self.metrics is not None:
            self.metrics.upstream(route.template, upstream.status, upstream_s)
        reason = upstream.reason.encode("latin-1")
        block, dated = self._response_block(upstream.headers)
        whole = upstream.body_if_complete()
        if whole is None:
            request.spawn(self._relay(request, route, upstream, reason, block, dated, done))
            return
        # The usual JSON answer (and a finished run's events) arrived with its headers: one write.
        upstream.release()
        request.relay_whole(upstream.status, reason, block, dated, whole)
        if route.streaming and self.metrics is not None:
            self.metrics.stream_lines += whole.count(b"\n")
            self.metrics.stream_bytes += len(whole)
        done(request, 0)

    async def _send(self, pool: UpstreamPool, route: Route, head: bytes, body: bytes | None,
                    idempotent: bool, deadline: float, first: int) -> PoolResponse:
        """Sends with retries, from attempt `first` on: a refused connection for any method (the
        request never left); a reset or a 502/503/504 only for GET, so a run is never started twice."""
        attempts = self.cfg.retries.attempts
        for attempt in range(first, attempts + 1):
            if attempt > first:
                if self.metrics is not None:
                    self.metrics.retried(route.template)
                if not await self._pause(attempt - 1, deadline):
                    raise TimeoutError()
            try:
                response = await pool.request(head, body, deadline=deadline)
            except PoolBusy:
                raise
            except UpstreamError as exc:
                if attempt == attempts or not (idempotent or not exc.sent):
                    raise
            else:
                if not (idempotent and response.status in _RETRYABLE_STATUSES and attempt < attempts):
                    return response
                response.release()
        raise AssertionError("unreachable")

    async def _relay(self, request: Request, route: Route, upstream: PoolResponse, reason: bytes, block: bytes,
                     dated: bool, done: Done) -> None:
        """A body that is still arriving: each piece goes to the client as it comes."""
        stream_metrics = self.metrics if route.streaming else None
        if stream_metrics is not None:
            stream_metrics.streams_open += 1
        completed = False
        try:
            request.start_stream(upstream.status, reason, block, dated, upstream.content_length)
            async for chunk in upstream.chunks(self.cfg.stream_idle_timeout_s):
                await request.send(chunk)
                if stream_metrics is not None:
                    stream_metrics.stream_lines += chunk.count(b"\n")
                    stream_metrics.stream_bytes += len(chunk)
            request.end_stream()
            completed = True
        except UpstreamError as exc:
            # The coordinator failed mid-body: the client must see a broken response, not a short success.
            if self.metrics is not None:
                self.metrics.upstream_failed(exc.kind)
            log.warning("upstream stream broken", extra={"event": "upstream_error", "kind": exc.kind,
                                                         "error": str(exc), "request_id": request.request_id})
            request.abort()
        except ClientGone:
            pass  # closing the upstream below frees its connection
        finally:
            if stream_metrics is not None:
                stream_metrics.streams_open -= 1
            if completed:
                upstream.release()
            else:
                upstream.close()
        done(request, 0)
