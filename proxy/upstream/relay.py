"""Relaying the coordinator's answer to the client.

An answer that arrived whole with its headers (the usual JSON, and a finished run's
events) goes out as one write; a body still arriving is written piece by piece as it
comes, so NDJSON events are never held back, with flow control both ways: a slow client
pauses the coordinator connection. Streams have an idle timeout but no total one: an
event stream may legitimately stay open for hours. A coordinator that fails mid-body
ends the client's answer abnormally, never as a short success.

    relay = Relay(metrics, stream_idle_timeout_s=300)
    pending = relay.answer(request, route, response, done)   # a coroutine when the body streams
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..arp.routes import Route
from ..edge.errors import ClientGone
from ..edge.request import Request
from ..edge.writer import reason_phrase
from .headers import ResponseHeaders
from .pool import PoolResponse, UpstreamError
from .sink import UpstreamMetrics

log = logging.getLogger("proxy.upstream.relay")

# Called once a request's answer is written (or the client has left: failed 499).
Done = Callable[[Request, int], object]   # what it returns is not read
# Shown a whole answer (status, body) before it is relayed, when the gateway must learn from it
# (a run start's run id and owner); None, the usual case, costs nothing.
Peek = Callable[[int, bytes], None]
# A peeked body that streams is gathered up to this size; a larger one is relayed unseen.
PEEK_LIMIT = 1024 * 1024


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field
class Fetched:
    """A coordinator answer read whole by the gateway itself (a run looked up before it is relayed)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Relay:
    def __init__(self, metrics: UpstreamMetrics | None, *, stream_idle_timeout_s: float) -> None:
        self.metrics = metrics
        self._idle_timeout = stream_idle_timeout_s
        self._headers = ResponseHeaders()

    def answer(self, request: Request, route: Route, upstream: PoolResponse,
               done: Done, reply: bytes = b"", peek: Peek | None = None) -> Coroutine[Any, Any, None] | None:
        """Answers the client from `upstream`, with the gateway's header lines `reply` added, and
        calls `done`; or returns the coroutine that will, when the body is still arriving. `peek`,
        when given, is shown the whole answer before it is relayed."""
        request.upstream_s = upstream_s = time.perf_counter() - request.upstream_start
        if self.metrics is not None:
            self.metrics.upstream(route.template, upstream.status, upstream_s)
        # The gateway's own reason phrase: the coordinator's is free text (RFC 9112 4), so not relayed.
        reason = reason_phrase(upstream.status)
        block, dated = self._headers.block(upstream.headers)
        if reply:
            block += reply
        whole = upstream.body_if_complete()
        if whole is None:
            return self._stream(request, route, upstream, reason, block, dated, done, peek)
        upstream.release()
        if peek is not None:
            peek(upstream.status, whole)
        request.relay_whole(upstream.status, reason, block, dated, whole)
        if route.streaming and self.metrics is not None:
            self.metrics.stream_lines += whole.count(b"\n")
            self.metrics.stream_bytes += len(whole)
        done(request, 0)
        return None

    def fetched(self, request: Request, route: Route, answer: Fetched, done: Done) -> None:
        """Answers the client with a coordinator answer the gateway has already read whole."""
        request.upstream_s = upstream_s = time.perf_counter() - request.upstream_start
        if self.metrics is not None:
            self.metrics.upstream(route.template, answer.status, upstream_s)
        block, dated = self._headers.block(answer.headers)
        request.relay_whole(answer.status, reason_phrase(answer.status), block, dated, answer.body)
        done(request, 0)

    async def _stream(self, request: Request, route: Route, upstream: PoolResponse, reason: bytes, block: bytes,
                      dated: bool, done: Done, peek: Peek | None = None) -> None:
        """A body that is still arriving: each piece goes to the client as it comes."""
        seen: list[bytes] | None = [] if peek is not None else None
        seen_bytes = 0
        stream_metrics = self.metrics if route.streaming else None
        if stream_metrics is not None:
            stream_metrics.streams_open += 1
        completed = False
        try:
            request.start_stream(upstream.status, reason, block, dated, upstream.content_length)
            async for chunk in upstream.chunks(self._idle_timeout):
                if seen is not None:
                    seen_bytes += len(chunk)
                    seen = seen if seen_bytes <= PEEK_LIMIT else None
                    if seen is not None:
                        seen.append(chunk)
                await request.send(chunk)
                if stream_metrics is not None:
                    stream_metrics.stream_lines += chunk.count(b"\n")
                    stream_metrics.stream_bytes += len(chunk)
            request.end_stream()
            completed = True
            if peek is not None and seen is not None:
                peek(upstream.status, b"".join(seen))
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
