"""Observing requests: the one place that counts a request in and out and writes its log line.

Every request passes `begin` once when the listener hands it over and `end` once when its
answer is written (or it ended without one: 499 when the client left, 500 when handling
failed), so `requests_in_flight` can never drift and every answer has its metrics and its
access-log line.

    observer = RequestObserver(metrics, access_log)
    started = observer.begin()
    ...
    observer.end(request, route, outcome, started, status=0)     # 0: the status the answer carried
"""

from __future__ import annotations

import time

from ..arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, Route
from ..auth import EXEMPT, AuthOutcome
from ..edge.request import Request
from .accesslog import AccessLog
from .metrics import GatewayMetrics

# Characters after the run id in each route that names one (its path starts "/v1/runs/").
_RUN_ID_TAIL = {GET_RUN: 0, CANCEL_RUN: len(":cancel"), RUN_EVENTS: len("/events")}


class RequestObserver:
    def __init__(self, metrics: GatewayMetrics | None, access_log: AccessLog | None) -> None:
        self._metrics = metrics
        self._access_log = access_log

    def begin(self) -> float:
        """Counts a request in; its start time, for `end`."""
        if self._metrics is not None:
            self._metrics.in_flight += 1
        return time.perf_counter()

    def end(self, request: Request, route: Route, outcome: AuthOutcome | None, started: float,
            status: int = 0) -> str | None:
        """`status`: what the request ended with when it was not an answer (499, 500). The time the
        access-log line carries (None with the access log off), for the request's other records."""
        seconds = time.perf_counter() - started
        status = status or request.status or 500
        principal = outcome.principal if outcome is not None else None
        metrics = self._metrics
        if metrics is not None:
            metrics.in_flight -= 1
            metrics.request(route.template, request.method, status, seconds,
                            None if outcome is None or outcome is EXEMPT else
                            (outcome.issuer, outcome.result, outcome.reason))
        if self._access_log is not None:
            tail = _RUN_ID_TAIL.get(route)
            return self._access_log.record(
                request.request_id, request.method or "-", route.template, status, seconds, request.upstream_s,
                request.body_size, request.bytes_out, outcome.result if outcome else "none",
                outcome.reason if outcome else "", principal.subject if principal else None,
                request.client or request.conn.peer, request.user_agent, outcome.issuer if outcome else None,
                None if tail is None else request.path[9:len(request.path) - tail])
        return None
