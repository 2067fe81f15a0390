"""Forwarding to the Run Coordinator: one pooled session, header hygiene, streaming both ways.

    upstream = Upstream(cfg.upstream)
    await upstream.start()
    response = await upstream.forward(request, route, body, extra_headers, request_id)

Bodies pass through as bytes (`auto_decompress=False`); each chunk the
coordinator sends is written to the client as soon as it arrives, so NDJSON
events are never held back. Streams have connect and idle timeouts but no
total timeout: an event stream may legitimately stay open for hours.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp_retry import RetryClient
from aiohttp_retry.retry_options import RetryOptionsBase
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .config import RetryConfig, UpstreamConfig
from .errors import error_response
from .metrics import GatewayMetrics
from .routes import ALL_ROUTES, Route

log = logging.getLogger("proxy.forwarding")

# RFC 9110 section 7.6.1 plus the legacy names proxies still meet in the wild.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})
# Set by the gateway itself, never copied from the client.
_REPLACED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                       "x-request-id", "expect", "authorization", "content-length"})
_RETRYABLE_STATUSES = frozenset({502, 503, 504})
# What the access log learns about a relayed response.
UPSTREAM_SECONDS = web.ResponseKey("upstream_s", float)
BYTES_OUT = web.ResponseKey("bytes_out", int)


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    status: int
    code: str
    message: str
    kind: str            # connect, timeout, reset, protocol: the metrics label
    retryable: bool


class _JitteredBackoff(RetryOptionsBase):
    """Full-jitter exponential backoff, so retrying gateways do not stampede a recovering coordinator."""

    def __init__(self, cfg: RetryConfig, *, exceptions: set[type[Exception]], statuses: bool,
                 on_retry: Callable[[], None] | None = None) -> None:
        super().__init__(attempts=cfg.attempts, exceptions=exceptions, retry_all_server_errors=False,
                         evaluate_response_callback=self._retry_status if statuses else None)
        self._base = cfg.backoff_initial_s
        self._cap = cfg.backoff_max_s
        self._on_retry = on_retry

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        # aiohttp-retry asks for the delay exactly once before each retry: the place to count them.
        if self._on_retry is not None:
            self._on_retry()
        return random.uniform(0, min(self._cap, self._base * (2 ** (attempt - 1))))

    @staticmethod
    async def _retry_status(response: aiohttp.ClientResponse) -> bool:
        """True accepts the response; a retried one is released so its connection is reused."""
        if response.status in _RETRYABLE_STATUSES:
            response.release()
            return False
        return True


def _connection_tokens(headers: MultiMapping[str]) -> str | None:
    """Every `Connection` line, joined: a list header may be split over several lines (RFC 9110 5.3)."""
    return ", ".join(headers.getall("Connection", ())) or None


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], connection: str | None,
                     also: frozenset[str] = frozenset(), prefix: str | None = None) -> CIMultiDict[str]:
    """Copies headers minus hop-by-hop ones, those `Connection` names, `also`, and any starting with `prefix`."""
    named = {t.strip().lower() for t in connection.split(",")} if connection else set()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in also or (prefix and low.startswith(prefix)):
            continue
        out.add(name, value)
    return out


def classify(exc: BaseException, *, idempotent: bool) -> UpstreamFailure:
    """Maps a client-side exception to the ErrorEnvelope the caller sees."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, "run_coordinator_unavailable",
                               "The Run Coordinator could not be reached", "connect", True)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamFailure(504, "run_coordinator_timeout",
                               "The Run Coordinator did not answer in time", "timeout", idempotent)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
        return UpstreamFailure(502, "run_coordinator_unavailable",
                               "The Run Coordinator closed the connection", "reset", idempotent)
    return UpstreamFailure(502, "run_coordinator_bad_response",
                           "The Run Coordinator sent an invalid response", "protocol", False)


class Upstream:
    def __init__(self, cfg: UpstreamConfig, metrics: GatewayMetrics | None = None) -> None:
        self.cfg = cfg
        self.base_url = cfg.url
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._client: RetryClient | None = None
        connect_failures: set[type[Exception]] = {aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError}
        safe_failures = connect_failures | {aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                                            aiohttp.ServerTimeoutError}
        # A request that may have reached the coordinator is retried only when repeating it is harmless.
        self._retry: dict[tuple[str, bool], _JitteredBackoff] = {}
        for route in ALL_ROUTES:
            if route.forward:
                counter = metrics.retry[route.template] if metrics is not None else None
                self._retry[route.template, True] = _JitteredBackoff(
                    cfg.retries, statuses=True, exceptions=safe_failures, on_retry=counter)
                self._retry[route.template, False] = _JitteredBackoff(
                    cfg.retries, statuses=False, exceptions=connect_failures, on_retry=counter)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=0,
                                         keepalive_timeout=30, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.stream_idle_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self._client = RetryClient(client_session=self._session, raise_for_status=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _request_headers(self, request: web.Request, extra: Iterable[tuple[str, str]],
                         request_id: str, strip_prefix: str | None) -> CIMultiDict[str]:
        headers = strip_hop_by_hop(request.headers.items(), _connection_tokens(request.headers),
                                   _REPLACED, strip_prefix)
        peer = request.remote or ""
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        headers["X-Request-ID"] = request_id
        if request.content_length is not None and request.body_exists:
            headers["Content-Length"] = str(request.content_length)
        for name, value in extra:
            headers[name] = value
        return headers

    async def forward(self, request: web.Request, route: Route, body: bytes | None,
                      extra: Iterable[tuple[str, str]], request_id: str,
                      strip_prefix: str | None = None) -> web.StreamResponse:
        if self.base_url is None:
            return error_response(
                503, "run_coordinator_missing",
                "No Run Coordinator is configured: set upstream.url or JARVIS_RUN_COORDINATOR_URL",
                request_id=request_id, retryable=False)
        idempotent = request.method == "GET"
        headers = self._request_headers(request, extra, request_id, strip_prefix)
        data = body if body is not None else (request.content if request.body_exists else None)
        if body is not None:
            headers["Content-Length"] = str(len(body))
        assert self._client is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                upstream = await self._client.request(
                    # encoded=True: forward the raw path the route matched; yarl would requote %3A to ':' etc.
                    request.method, URL(self.base_url + request.raw_path, encoded=True), headers=headers,
                    data=data,
                    allow_redirects=False,
                    retry_options=self._retry[route.template, idempotent])
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            failure = classify(exc, idempotent=idempotent)
            if self.metrics is not None:
                self.metrics.upstream_error[failure.kind]()
            log.warning("upstream request failed", extra={"event": "upstream_error", "kind": failure.kind,
                                                          "error": type(exc).__name__, "request_id": request_id})
            return error_response(failure.status, failure.code, failure.message, request_id=request_id,
                                  retryable=failure.retryable)
        upstream_s = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.upstream(route.template, upstream.status, upstream_s)
        return await self._relay(request, route, upstream, request_id, upstream_s)

    async def _relay(self, request: web.Request, route: Route, upstream: aiohttp.ClientResponse,
                     request_id: str, upstream_s: float) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(strip_hop_by_hop(upstream.headers.items(), _connection_tokens(upstream.headers)))
        response.headers["X-Request-ID"] = request_id
        response[UPSTREAM_SECONDS] = upstream_s
        stream_metrics = self.metrics if route.streaming else None
        if stream_metrics is not None:
            stream_metrics.streams_open.inc()
        sent = 0
        completed = False
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                sent += len(chunk)
                if stream_metrics is not None:
                    stream_metrics.stream_lines.inc(chunk.count(b"\n"))
                    stream_metrics.stream_bytes.inc(len(chunk))
            completed = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # The coordinator failed mid-body: the client must see a broken response, not a short success.
            kind = classify(exc, idempotent=False).kind
            if self.metrics is not None:
                self.metrics.upstream_error[kind]()
            log.warning("upstream stream broken", extra={"event": "upstream_error", "kind": kind,
                                                         "error": type(exc).__name__, "request_id": request_id})
            _abort(request)
        except ConnectionError:
            pass  # the client went away; closing the upstream below frees its connection
        finally:
            response[BYTES_OUT] = sent
            if stream_metrics is not None:
                stream_metrics.streams_open.dec()
            if completed:
                upstream.release()
            else:
                upstream.close()
        return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()

