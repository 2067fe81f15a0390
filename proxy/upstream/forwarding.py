"""Forwarding to the Run Coordinator: the exchange, its timeouts and its retries.

    upstream = Upstream(cfg.upstream, metrics, strip_prefix="X-Auth-")
    await upstream.start()
    upstream.forward(request, route, body, header_lines, done)    # answers `request`, then done(request, 0)

Requests go out on the keep-alive pool of `pool.py`, framed by the gateway
alone: the listener has the whole body, so it goes with its exact
Content-Length, never with the client's framing; `headers.py` decides which
header lines cross, `relay.py` writes the answer back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..arp.answers import Answer, error_answer
from ..arp.routes import Route
from ..edge.request import Request
from ..edge.tls import CertificateFiles
from ..settings.config import UpstreamConfig
from ..util.certificates import build_context
from .headers import ClientHeaders, TrustedProxies
from .pool import BadResponse, ConnectFailed, PoolBusy, PoolResponse, UpstreamError, UpstreamPool
from .relay import Done, Fetched, Peek, Relay
from .retry import RetryPolicy
from .sink import UpstreamMetrics

log = logging.getLogger("proxy.upstream")

# What a lookup ends in: the coordinator's answer, read whole, or the ErrorEnvelope when none came.
Looked = Callable[[Fetched | Answer], None]

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


def _holds_stream(request: Request, route: Route) -> bool:
    """Whether the answer may hold its connection for a run's lifetime (not a CORS preflight)."""
    return route.streaming and request.method == "GET"


class Upstream:
    def __init__(self, cfg: UpstreamConfig, metrics: UpstreamMetrics | None = None, *,
                 strip_prefix: str = "", strip_names: Iterable[str] = (),
                 trusted: TrustedProxies | None = None) -> None:
        self.cfg = cfg
        self.base_url = cfg.url
        self.metrics = metrics
        self._client_headers = ClientHeaders(strip_prefix=strip_prefix, strip_names=strip_names, trusted=trusted)
        self._relay = Relay(metrics, stream_idle_timeout_s=cfg.stream_idle_timeout_s)
        self.pool: UpstreamPool | None = None
        self._retry = RetryPolicy(cfg.retries)
        self._loop: asyncio.AbstractEventLoop  # set by start(), inside the running loop
        # A private CA or a client certificate for an https:// coordinator: its context follows the files.
        tls = cfg.tls
        self.certificates = CertificateFiles(
            "upstream", tls.files, lambda files: build_context(files, server=False),
            reload_interval_s=tls.reload_interval_s) if (tls.ca_file or tls.cert_file) else None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # once: on Python 3.11 each lookup is a getpid() call
        if self.base_url is not None:
            self.pool = UpstreamPool(self.base_url, max_connections=self.cfg.max_connections,
                                     connect_timeout_s=self.cfg.connect_timeout_s,
                                     idle_timeout_s=self.cfg.keepalive_idle_s,
                                     sweep_interval_s=min(1.0, self.cfg.request_timeout_s / 10),
                                     queue_timeout_s=self.cfg.queue_timeout_s,
                                     stream_share=self.cfg.stream_share,
                                     max_response_head_bytes=self.cfg.max_response_header_bytes,
                                     ssl_context=self._tls_context if self.certificates is not None else None,
                                     server_name=self.cfg.tls.server_name)

    def _tls_context(self) -> ssl.SSLContext:
        assert self.certificates is not None
        return self.certificates.context

    async def close(self) -> None:
        if self.certificates is not None:
            self.certificates.stop()
        if self.pool is not None:
            await self.pool.close()

    def _head(self, request: Request, pool: UpstreamPool, extra: bytes, framing: bytes) -> bytes:
        return b"".join((request.method.encode(), b" ", pool.base_path, request.target, b" HTTP/1.1\r\nHost: ",
                         pool.host_header, b"\r\n", self._client_headers.block(request), b"X-Request-ID: ",
                         request.request_id.encode(), b"\r\n", extra, framing, b"\r\n"))

    def forward(self, request: Request, route: Route, body: bytes | None, extra: bytes, done: Done,
                reply: bytes = b"", peek: Peek | None = None) -> None:
        """Sends the request (its whole body, if any) and answers the client with what the coordinator
        says, with the header lines `reply` added; calls `done(request, failed)` once the answer is
        written; `peek`, when given, is shown the answer (status and whole body) as it is relayed.

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
        request.upstream_start = time.perf_counter()
        conn = pool.idle_connection(deadline, _holds_stream(request, route))
        if conn is None:
            request.spawn(self._exchange(request, route, head, body, deadline, done, 1, reply, peek))
            return

        def on_headers(response: PoolResponse | None, error: UpstreamError | TimeoutError | None) -> None:
            request.aborter = None
            if response is None:
                conn.finish(reusable=False)
                assert error is not None
                if self._retry.after_error(request.method, error, 1):
                    request.spawn(self._exchange(request, route, head, body, deadline, done, 2, reply, peek))
                else:
                    self._refuse(request, error)
                    done(request, 0)
            elif self._retry.after_status(request.method, response.status, 1):
                response.release()
                request.spawn(self._exchange(request, route, head, body, deadline, done, 2, reply, peek))
            else:
                pending = self._relay.answer(request, route, response, done, reply, peek)
                if pending is not None:
                    request.spawn(pending)

        def abandon() -> None:  # the client left first
            conn.finish(reusable=False)
            done(request, 499)

        request.aborter = abandon
        conn.start(head, body, deadline, on_headers)

    async def _exchange(self, request: Request, route: Route, head: bytes, body: bytes | None, deadline: float,
                        done: Done, attempt: int, reply: bytes = b"", peek: Peek | None = None) -> None:
        """The same exchange, from attempt number `attempt` on, for when it has to wait: for a pool
        connection, or between retries."""
        try:
            response = await self._attempts(route, request.method, head, body, deadline,
                                            _holds_stream(request, route), attempt)
        except (UpstreamError, TimeoutError) as exc:
            self._refuse(request, exc)
            done(request, 0)
            return
        pending = self._relay.answer(request, route, response, done, reply, peek)
        if pending is not None:
            await pending

    def lookup(self, request: Request, route: Route, run_id: bytes, extra: bytes, done: Done,
               then: Looked) -> None:
        """`GET /v1/runs/{run_id}` on the gateway's own behalf (the same pool, the same identity
        header lines as the request it serves), read whole so the gateway can decide on it before
        any byte reaches the client, with the retries a GET has; `then` gets the answer, or the
        ErrorEnvelope when none came. Like `forward`, the usual lookup (an idle connection, an
        answer that arrives whole) runs on callbacks alone; anything else continues in a task.
        `done(request, 499)` when the client leaves while it waits."""
        pool = self.pool
        if pool is None:
            then(error_answer(503, "run_coordinator_missing",
                              "No Run Coordinator is configured: set upstream.url or JARVIS_RUN_COORDINATOR_URL",
                              request_id=request.request_id, retryable=False))
            return
        head = b"".join((b"GET ", pool.base_path, b"/v1/runs/", run_id, b" HTTP/1.1\r\nHost: ", pool.host_header,
                         b"\r\nAccept: application/json\r\nX-Request-ID: ", request.request_id.encode(), b"\r\n",
                         extra, b"\r\n"))
        deadline = self._loop.time() + self.cfg.request_timeout_s
        request.upstream_start = time.perf_counter()
        conn = pool.idle_connection(deadline)
        if conn is None:
            request.spawn(self._lookup(request, route, head, deadline, then, 1))
            return

        def on_headers(response: PoolResponse | None, error: UpstreamError | TimeoutError | None) -> None:
            request.aborter = None
            if response is None:
                conn.finish(reusable=False)
                assert error is not None
                if self._retry.after_error("GET", error, 1):
                    request.spawn(self._lookup(request, route, head, deadline, then, 2))
                else:
                    then(self._failure(request, error))
            elif self._retry.after_status("GET", response.status, 1):
                response.release()
                request.spawn(self._lookup(request, route, head, deadline, then, 2))
            else:
                whole = response.body_if_complete()
                if whole is None:
                    request.spawn(self._lookup_body(request, response, then))
                else:
                    response.release()
                    then(Fetched(response.status, response.headers, whole))

        def abandon() -> None:  # the client left first
            conn.finish(reusable=False)
            done(request, 499)

        request.aborter = abandon
        conn.start(head, None, deadline, on_headers)

    async def _lookup(self, request: Request, route: Route, head: bytes, deadline: float, then: Looked,
                      attempt: int) -> None:
        """The lookup, from attempt number `attempt` on, when it has to wait."""
        try:
            response = await self._attempts(route, "GET", head, None, deadline, False, attempt)
        except (UpstreamError, TimeoutError) as exc:
            then(self._failure(request, exc))
            return
        await self._lookup_body(request, response, then)

    async def _attempts(self, route: Route, method: str, head: bytes, body: bytes | None, deadline: float,
                        stream: bool, attempt: int) -> PoolResponse:
        """The attempts of one exchange from number `attempt` on, under the one retry policy: the
        answer to use, or the last failure raised (TimeoutError when the deadline leaves no room for
        the next pause). Shared by forwarded requests and the gateway's own lookups."""
        pool = self.pool
        assert pool is not None
        policy = self._retry
        while True:
            if attempt > 1:
                if self.metrics is not None:
                    self.metrics.retried(route.template)
                pause = policy.pause(attempt - 1)
                if self._loop.time() + pause >= deadline:
                    raise TimeoutError()
                await asyncio.sleep(pause)
            try:
                response = await pool.request(head, body, deadline=deadline, stream=stream)
            except (UpstreamError, TimeoutError) as exc:
                if policy.after_error(method, exc, attempt):
                    attempt += 1
                    continue
                raise
            if not policy.after_status(method, response.status, attempt):
                return response
            response.release()
            attempt += 1

    async def _lookup_body(self, request: Request, response: PoolResponse, then: Looked) -> None:
        try:
            fetched = await _read_whole(response, self.cfg.request_timeout_s)
        except (UpstreamError, TimeoutError) as exc:
            then(self._failure(request, exc))
            return
        then(fetched)

    def relay_fetched(self, request: Request, route: Route, answer: Fetched, done: Done) -> None:
        self._relay.fetched(request, route, answer, done)

    def _refuse(self, request: Request, exc: BaseException) -> None:
        request.respond(self._failure(request, exc))

    def _failure(self, request: Request, exc: BaseException) -> Answer:
        """The ErrorEnvelope for an exchange that failed before the coordinator answered."""
        if isinstance(exc, PoolBusy):
            # Every coordinator connection stayed busy for queue_timeout_s: shed instead of queueing
            # without bound. The request never left, so any method may be retried by the client.
            return error_answer(
                503, "run_coordinator_busy", "The Run Coordinator is at capacity; retry shortly",
                request_id=request.request_id, retryable=True,
                details={"max_connections": self.cfg.max_connections},
                headers={"Retry-After": str(max(1, math.ceil(self.cfg.queue_timeout_s)))})
        failure = classify(exc, idempotent=request.method == "GET")
        if self.metrics is not None:
            self.metrics.upstream_failed(failure.kind)
        log.warning("upstream request failed", extra={"event": "upstream_error", "kind": failure.kind,
                                                      "error": str(exc) or type(exc).__name__,
                                                      "request_id": request.request_id})
        return error_answer(failure.status, failure.code, failure.message,
                            request_id=request.request_id, retryable=failure.retryable)


# A run looked up by the gateway is read whole; a coordinator that sends more is not believed.
MAX_LOOKUP_BYTES = 4 * 1024 * 1024


async def _read_whole(response: PoolResponse, idle_timeout_s: float) -> Fetched:
    whole = response.body_if_complete()
    if whole is None:
        parts, size = [], 0
        try:
            async for chunk in response.chunks(idle_timeout_s):
                size += len(chunk)
                if size > MAX_LOOKUP_BYTES:
                    raise BadResponse(f"a run over {MAX_LOOKUP_BYTES} bytes")
                parts.append(chunk)
        except BaseException:
            response.close()
            raise
        whole = b"".join(parts)
    response.release()
    return Fetched(response.status, response.headers, whole)
