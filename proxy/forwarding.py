"""Forwarding to the Run Coordinator: header hygiene, retries, timeouts, streaming both ways.

    upstream = Upstream(cfg.upstream, metrics, strip_prefix="x-auth-")
    await upstream.start()
    response = await upstream.forward(request, route, body, header_lines, request_id)

Requests go out on the keep-alive pool of `pool.py`; headers are copied as
the raw bytes the client sent, minus hop-by-hop ones and the identity headers
only the gateway may set. Each chunk the coordinator sends is written to the
client as soon as it arrives, so NDJSON events are never held back. Streams
have connect, header and idle timeouts but no total timeout: an event stream
may legitimately stay open for hours.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache

import aiohttp
from aiohttp import web

from .config import UpstreamConfig
from .errors import error_response
from .metrics import GatewayMetrics
from .pool import ConnectFailed, PoolResponse, UpstreamError, UpstreamPool
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
# X-Request-ID is the gateway's; a whole body is reframed with its own Content-Length.
_NOT_RELAYED = HOP_BY_HOP | {b"x-request-id"}
_REFRAMED = _NOT_RELAYED | {b"content-length"}
RESPONSE_HEADER_CACHE = 256
# Like aiohttp's writer: wait for the client to take a large answer before reading the next request.
_DRAIN_ABOVE = 64 * 1024
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
            named.update(t.strip().lower() for t in value.split(b","))
    return frozenset(named)


def end_to_end(raw: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The coordinator's headers minus `drop` and any named on its Connection lines."""
    named = connection_tokens(raw) if any(n.lower() == b"connection" for n, _ in raw) else frozenset()
    return [(name, value) for name, value in raw if (low := name.lower()) not in drop and low not in named]


def response_headers(raw: list[tuple[bytes, bytes]], request_id: str) -> list[tuple[str, str]]:
    """The coordinator's headers for a streamed answer, X-Request-ID set.

    A plain list, because aiohttp builds its own header multidict from whatever it is given."""
    out = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in end_to_end(raw, _NOT_RELAYED)]
    out.append(("X-Request-ID", request_id))
    return out


def response_header_block(raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """The coordinator's header lines for an answer with a whole body, which the gateway frames
    itself; and whether the coordinator sent a Date."""
    kept = end_to_end(raw, _REFRAMED)
    return b"".join(b"%s: %s\r\n" % pair for pair in kept), any(name.lower() == b"date" for name, _ in raw)


@lru_cache(maxsize=1)
def http_date(second: int) -> bytes:
    """An RFC 9110 Date header line for this second: formatted once, whatever the request rate."""
    return b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"


class RelayedResponse(web.StreamResponse):
    """A coordinator answer that arrived whole, written to the client as one buffer.

    aiohttp's `web.Response` would rebuild the headers as a multidict and serialize them again,
    about a sixth of the gateway's CPU per request. This writes the filtered header bytes as the
    coordinator sent them, adding only what this hop decides: framing, keep-alive, X-Request-ID."""

    def __init__(self, status: int, reason: str, header_block: tuple[bytes, bool], body: bytes,
                 request_id: str) -> None:
        super().__init__(status=status, reason=reason)
        self._block, self._dated = header_block
        self._whole = body
        self._request_id = request_id

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._eof_sent:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self._keep_alive = keep_alive = request.keep_alive
        version = request.version
        status = self.status
        parts = [b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, status, self.reason.encode("latin-1")),
                 self._block, b"X-Request-ID: ", self._request_id.encode(), b"\r\n"]
        if not self._dated:
            parts.append(http_date(int(time.time())))  # RFC 9110 6.6.1: a proxy adds what a clockless origin left out
        body = self._whole
        if status < 200 or status in (204, 304) or request.method == "HEAD":
            body = b""  # RFC 9110 6.4.1: these answers never have content
        else:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        if keep_alive and version == aiohttp.HttpVersion10:
            parts.append(b"Connection: keep-alive\r\n")
        elif not keep_alive and version == aiohttp.HttpVersion11:
            parts.append(b"Connection: close\r\n")
        parts += (b"\r\n", body)
        transport.write(b"".join(parts))
        self._eof_sent = True  # aiohttp's write_eof is then a no-op
        self._body_length = len(body)
        if len(body) > _DRAIN_ABOVE:
            await request.writer.drain()


class Upstream:
    def __init__(self, cfg: UpstreamConfig, metrics: GatewayMetrics | None = None, *,
                 strip_prefix: str = "", strip_names: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.base_url = cfg.url
        self.metrics = metrics
        self._strip_prefix = strip_prefix.lower().encode() or None
        self._drop = HOP_BY_HOP | _REPLACED | {n.lower().encode() for n in strip_names}
        self.pool: UpstreamPool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start(), inside the running loop
        self._client_blocks: dict[tuple[tuple[tuple[bytes, bytes], ...], str | None], bytes] = {}
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
                                     idle_timeout_s=self.cfg.keepalive_idle_s)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self._session is not None:
            await self._session.close()

    def _head(self, request: web.Request, pool: UpstreamPool, extra: bytes,
              request_id: str, framing: bytes) -> bytes:
        return b"".join((request.method.encode(), b" ", pool.base_path.encode(),
                         request.raw_path.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\nHost: ",
                         pool.host_header, b"\r\n", self._client_headers(request), b"X-Request-ID: ",
                         request_id.encode(), b"\r\n", extra, framing, b"\r\n"))

    def _client_headers(self, request: web.Request) -> bytes:
        """The client's headers as the coordinator gets them, cached by their exact bytes and the peer:
        a keep-alive client sends the same headers request after request."""
        key = (request.raw_headers, request.remote)
        block = self._client_blocks.get(key)
        if block is None:
            block = self._filter_client_headers(request)
            if len(self._client_blocks) >= CLIENT_HEADER_CACHE:
                self._client_blocks.clear()
            self._client_blocks[key] = block
        return block

    def _filter_client_headers(self, request: web.Request) -> bytes:
        raw = request.raw_headers
        drop = self._drop | connection_tokens(raw) if "Connection" in request.headers else self._drop
        prefix = self._strip_prefix
        prior: list[bytes] = []
        parts: list[bytes] = []
        for name, value in raw:
            low = name.lower()
            if low in drop or (prefix is not None and low.startswith(prefix)):
                if low == b"x-forwarded-for":
                    prior.append(value)
                continue
            parts += (name, b": ", value, b"\r\n")
        peer = (request.remote or "").encode()
        parts += (b"X-Forwarded-For: ", b", ".join([*prior, peer]), b"\r\nX-Forwarded-Proto: ",
                  request.scheme.encode(), b"\r\nX-Forwarded-Host: ", request.host.encode("utf-8", "surrogateescape"),
                  b"\r\n")
        return b"".join(parts)

    def _response_block(self, raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
        """Cached by the exact header bytes: a coordinator repeats its headers answer after answer,
        only its Date moving once a second."""
        key = tuple(raw)
        block = self._response_blocks.get(key)
        if block is None:
            block = response_header_block(raw)
            if len(self._response_blocks) >= RESPONSE_HEADER_CACHE:
                self._response_blocks.clear()
            self._response_blocks[key] = block
        return block

    async def forward(self, request: web.Request, route: Route, body: bytes | None,
                      extra: bytes, request_id: str) -> web.StreamResponse:
        pool = self.pool
        if pool is None:
            return error_response(
                503, "run_coordinator_missing",
                "No Run Coordinator is configured: set upstream.url or JARVIS_RUN_COORDINATOR_URL",
                request_id=request_id, retryable=False)
        idempotent = request.method == "GET"
        payload: bytes | object | None = body
        if body is not None:
            framing = b"Content-Length: %d\r\n" % len(body)
        elif not request.body_exists:
            framing = b"Content-Length: 0\r\n" if request.method == "POST" else b""
        elif request.content_length is not None:
            framing, payload = b"Content-Length: %d\r\n" % request.content_length, _raw_body(request)
        else:
            framing, payload = b"Transfer-Encoding: chunked\r\n", request.content.iter_any()
        head = self._head(request, pool, extra, request_id, framing)
        started = time.perf_counter()
        deadline = self._loop.time() + self.cfg.request_timeout_s
        chunked = framing.startswith(b"Transfer")
        try:
            if payload is None or isinstance(payload, bytes):
                upstream = await self._exchange(pool, route, head, payload, idempotent, chunked, deadline)
            else:
                # A streamed body can stall on the client's side too: bound the whole send.
                async with asyncio.timeout_at(deadline):
                    upstream = await self._exchange(pool, route, head, payload, idempotent, chunked, None)
        except (UpstreamError, TimeoutError) as exc:
            failure = classify(exc, idempotent=idempotent)
            if self.metrics is not None:
                self.metrics.upstream_failed(failure.kind)
            log.warning("upstream request failed", extra={"event": "upstream_error", "kind": failure.kind,
                                                          "error": str(exc) or type(exc).__name__,
                                                          "request_id": request_id})
            return error_response(failure.status, failure.code, failure.message, request_id=request_id,
                                  retryable=failure.retryable)
        upstream_s = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.upstream(route.template, upstream.status, upstream_s)
        return await self._relay(request, route, upstream, request_id, upstream_s)

    async def _exchange(self, pool: UpstreamPool, route: Route, head: bytes, payload: object,
                        idempotent: bool, chunked: bool, deadline: float | None) -> PoolResponse:
        """Sends with retries: a refused connection for any method (the request never left);
        a reset or a 502/503/504 only for GET, so a run is never started twice."""
        replayable = payload is None or isinstance(payload, bytes)
        attempts = self.cfg.retries.attempts if replayable else 1
        for attempt in range(1, attempts + 1):
            try:
                response = await pool.request(head, payload, chunked=chunked,  # type: ignore[arg-type]
                                              deadline=deadline)
            except UpstreamError as exc:
                if attempt == attempts or not (idempotent or not exc.sent):
                    raise
            else:
                if not (idempotent and response.status in _RETRYABLE_STATUSES and attempt < attempts):
                    return response
                response.release()
            if self.metrics is not None:
                self.metrics.retried(route.template)
            retries = self.cfg.retries
            pause = random.uniform(0, min(retries.backoff_max_s, retries.backoff_initial_s * 2 ** (attempt - 1)))
            if deadline is not None and asyncio.get_running_loop().time() + pause >= deadline:
                raise TimeoutError()
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _relay(self, request: web.Request, route: Route, upstream: PoolResponse,
                     request_id: str, upstream_s: float) -> web.StreamResponse:
        whole = upstream.body_if_complete()
        if whole is not None:
            # The usual JSON answer arrived with its headers: one write, no streaming machinery.
            upstream.release()
            response: web.StreamResponse = RelayedResponse(
                upstream.status, upstream.reason, self._response_block(upstream.headers), whole, request_id)
            response[UPSTREAM_SECONDS] = upstream_s
            response[BYTES_OUT] = len(whole)
            return response
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=response_headers(upstream.headers, request_id))
        response[UPSTREAM_SECONDS] = upstream_s
        stream_metrics = self.metrics if route.streaming else None
        if stream_metrics is not None:
            stream_metrics.streams_open += 1
        sent = 0
        completed = False
        try:
            await response.prepare(request)
            async for chunk in upstream.chunks(self.cfg.stream_idle_timeout_s):
                await response.write(chunk)
                sent += len(chunk)
                if stream_metrics is not None:
                    stream_metrics.stream_lines += chunk.count(b"\n")
                    stream_metrics.stream_bytes += len(chunk)
            completed = True
        except UpstreamError as exc:
            # The coordinator failed mid-body: the client must see a broken response, not a short success.
            if self.metrics is not None:
                self.metrics.upstream_failed(exc.kind)
            log.warning("upstream stream broken", extra={"event": "upstream_error", "kind": exc.kind,
                                                         "error": str(exc), "request_id": request_id})
            _abort(request)
        except ConnectionError:
            pass  # the client went away; closing the upstream below frees its connection
        finally:
            response[BYTES_OUT] = sent
            if stream_metrics is not None:
                stream_metrics.streams_open -= 1
            if completed:
                upstream.release()
            else:
                upstream.close()
        return response


async def _raw_body(request: web.Request):
    async for chunk in request.content.iter_any():
        yield chunk


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()
