"""Prometheus metrics: what operators scrape from the sidecar and page on.

Labels are bounded by construction: route templates (never raw paths),
configured issuers (never the token's claim), a fixed set of methods and
reasons. The request path only bumps plain integers in pre-built slots (one
dict lookup, one `bisect` for a histogram bucket, no lock, no label dict):
prometheus-client's own metric objects take a lock per update, a measurable
share of throughput in the benchmark. A collector turns the slots into metric
families at scrape time, and reads state the gateway already keeps (JWKS
caches, the token cache) instead of counting it twice.

    metrics = GatewayMetrics(issuers=("https://idp",))
    metrics.request("/v1/runs", "POST", 200, 0.0012)
    body, content_type = metrics.exposition()
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..arp.routes import ALL_ROUTES, NOT_FOUND
from .audit import DECISIONS as AUDIT_DECISIONS
from .audit import EVENTS as AUDIT_EVENTS

if TYPE_CHECKING:
    from ..upstream.pool import UpstreamPool

PREFIX = "arp_gateway_"
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "protocol")
RUN_ACTIONS = ("start", "get", "cancel", "events")
# Why the listener turned a connection away, or closed one that was not done with.
CONNECTION_EVENTS = {"connections_refused": ("max_connections", "fd_limit", "buffer_budget"),
                     "connections_closed": ("reclaimed", "header_timeout", "body_timeout", "keepalive_timeout",
                                            "send_timeout")}
NO_ISSUER = "none"
# The audit trail's label values (observability/audit.py); anything else is counted as "other".
MAX_REQUEST_SLOTS = 4096
_TEMPLATES = frozenset(r.template for r in ALL_ROUTES)
_FORWARDED = tuple(r.template for r in ALL_ROUTES if r.forward)


class _Histogram:
    """Counts per bucket (not cumulative: one increment per observation) plus the sum.
    The hot path increments `counts[bisect_left(REQUEST_BUCKETS, seconds)]` itself, saving a call."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(REQUEST_BUCKETS) + 1)
        self.total = 0.0

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*REQUEST_BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric(labels, buckets, self.total)


class GatewayMetrics:
    def __init__(self, issuers: Iterable[str] = (), *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.issuers = frozenset(issuers)
        self.in_flight = 0
        self.streams_open = 0
        self.stream_lines = 0
        self.stream_bytes = 0
        self.rate_limited: dict[str, int] = {}
        self.streams_refused = 0  # event streams answered 429 too_many_streams
        # Run-start limit decisions by (backend, decision); Redis errors by kind, shared with the
        # gateway's Redis store; whether the last Redis call worked (None: no Redis configured).
        self.rate_decisions: dict[tuple[str, str], int] = {}
        self.redis_errors: dict[str, int] = {}
        self.redis_up: Callable[[], bool] | None = None
        # Run-route requests refused by runs.access or the policy, by action (start, get, cancel, events).
        self.run_access_denied = dict.fromkeys(RUN_ACTIONS, 0)
        self.pool: UpstreamPool | None = None  # the coordinator pool, read at scrape time for its queue counters
        self._requests: dict[tuple[str, str, int], list[int]] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        # Per (route, method, status, auth): its count, its histogram and its auth-decision count, together.
        self._request_slots: dict[tuple[str, str, int, tuple[str | None, str, str] | None],
                                  tuple[list[int], _Histogram, list[int] | None]] = {}
        self._upstream: dict[tuple[str, int], _Histogram] = {}
        self._upstream_errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self._retries = dict.fromkeys(_FORWARDED, 0)
        self._auth: dict[tuple[str, str, str], list[int]] = {}
        self._connection_events = {(family, reason): 0 for family, reasons in CONNECTION_EVENTS.items()
                                   for reason in reasons}
        self.open_connections: Callable[[], int] = lambda: 0
        self.buffered_bytes: Callable[[], int] = lambda: 0  # the listener's budget in use, read at scrape time
        self._overloaded = {"head": 0, "body": 0}
        # The audit trail counts each record here, under its (event, decision): both from fixed sets.
        self.audit_records = {(event, decision): 0 for event in AUDIT_EVENTS for decision in AUDIT_DECISIONS}
        self.audit_dropped_records = 0
        self._jwks_duration = Histogram(PREFIX + "jwks_fetch_duration_seconds", "JWKS (and discovery) fetch "
                                        "time", ("issuer",), registry=self.registry)
        for issuer in self.issuers:
            self._jwks_duration.labels(issuer)
        # TLS: rare events (reloads, failed handshakes), so prometheus-client's own objects suffice.
        self._tls_reloads = Counter(PREFIX + "tls_reloads", "Certificate reloads after the files changed or "
                                    "SIGHUP, by outcome (failure: the old certificate stayed in service)",
                                    ("certificate", "result"), registry=self.registry)
        self._tls_expiry = Gauge(PREFIX + "tls_certificate_expiry_timestamp_seconds", "notAfter of the "
                                 "certificate in service (unix time)", ("certificate",), registry=self.registry)
        self._tls_handshake_failures = Counter(PREFIX + "tls_handshake_failures", "TLS handshakes the public "
                                               "listener failed, by reason", ("reason",), registry=self.registry)
        Gauge(PREFIX + "build_info", "Gateway build", ("version",), registry=self.registry).labels(__version__).set(1)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_HotPathCollector(self))

    # -- hot path

    def request(self, template: str, method: str, status: int, seconds: float,
                auth: tuple[str | None, str, str] | None = None) -> None:
        """Once per finished request: its count and duration and, when auth ran, (issuer, result, reason).
        One call with the histogram inlined, and one lookup finds all three counts: this runs for every
        request the gateway serves."""
        key = (template, method, status, auth)
        slots = self._request_slots.get(key)
        if slots is None:
            slots = self._new_request_slots(key)
        counter, histogram, decisions = slots
        counter[0] += 1
        histogram.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        histogram.total += seconds
        if decisions is not None:
            decisions[0] += 1

    def _new_request_slots(self, key: tuple[str, str, int, tuple[str | None, str, str] | None]
                           ) -> tuple[list[int], _Histogram, list[int] | None]:
        template, method, status, auth = key
        label_method = method if method in KNOWN_METHODS else "other"
        label_route = template if template in _TEMPLATES else NOT_FOUND.template
        counter = self._requests.setdefault((label_route, label_method, status), [0])
        histogram = self._durations.setdefault((label_route, label_method), _Histogram())
        decisions = None if auth is None else \
            self._auth.setdefault((auth[0] if auth[0] in self.issuers else NO_ISSUER, auth[1], auth[2]), [0])
        slots = (counter, histogram, decisions)
        # Bounded: routes, methods, issuers, results and reasons are, but a hostile coordinator picks the
        # status; past the bound a combination is counted through its labels without a slot of its own.
        if len(self._request_slots) < MAX_REQUEST_SLOTS:
            self._request_slots[key] = slots
        return slots

    def upstream(self, template: str, status: int, seconds: float) -> None:
        histogram = self._upstream.get((template, status))
        if histogram is None:
            histogram = self._upstream[(template, status)] = _Histogram()
        histogram.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        histogram.total += seconds

    def upstream_failed(self, kind: str) -> None:
        self._upstream_errors[kind] += 1

    def retried(self, template: str) -> None:
        self._retries[template] += 1

    def connection_event(self, family: str, reason: str) -> None:
        self._connection_events[(family, reason)] += 1

    def overloaded(self, waiting_for: str) -> None:
        self._overloaded[waiting_for] += 1

    def audit_dropped(self, count: int) -> None:
        self.audit_dropped_records += count

    # -- control plane

    def jwks_fetched(self, issuer: str, seconds: float) -> None:
        if issuer in self.issuers:
            self._jwks_duration.labels(issuer).observe(seconds)

    def tls_certificate(self, certificate: str, not_after: float | None, handshake_reasons: Iterable[str] = ()) -> None:
        """A TLS context in service ("listen" or "upstream"): its series exist from the start, at zero."""
        for result in ("success", "failure"):
            self._tls_reloads.labels(certificate, result)
        for reason in handshake_reasons:
            self._tls_handshake_failures.labels(reason)
        if not_after is not None:
            self._tls_expiry.labels(certificate).set(not_after)

    def tls_reloaded(self, certificate: str, result: str, not_after: float | None) -> None:
        self._tls_reloads.labels(certificate, result).inc()
        if not_after is not None:
            self._tls_expiry.labels(certificate).set(not_after)

    def tls_handshake_failed(self, reason: str) -> None:
        self._tls_handshake_failures.labels(reason).inc()

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _HotPathCollector:
    """The request-path counters, as metric families, at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(PREFIX + "requests", "Requests answered, by route template, method and "
                                       "status code", labels=("route", "method", "code"))
        for (route, method, code), slot in sorted(m._requests.items()):
            requests.add_metric((route, method, str(code)), slot[0])
        durations = HistogramMetricFamily(PREFIX + "request_duration_seconds", "Time from request to the end of "
                                          "the response (streams: until the stream ends)", labels=("route", "method"))
        for (route, method), histogram in sorted(m._durations.items()):
            histogram.add_to(durations, [route, method])
        upstream = HistogramMetricFamily(PREFIX + "upstream_request_duration_seconds", "Time until the Run "
                                         "Coordinator's response headers", labels=("route", "code"))
        for (route, code), histogram in sorted(m._upstream.items()):
            histogram.add_to(upstream, [route, str(code)])
        errors = CounterMetricFamily(PREFIX + "upstream_errors", "Failed exchanges with the Run Coordinator",
                                     labels=("kind",))
        for kind, count in m._upstream_errors.items():
            errors.add_metric((kind,), count)
        retries = CounterMetricFamily(PREFIX + "upstream_retries", "Retried requests to the Run Coordinator",
                                      labels=("route",))
        for route, count in m._retries.items():
            retries.add_metric((route,), count)
        auth = CounterMetricFamily(PREFIX + "auth_decisions", "Authentication and authorization decisions",
                                   labels=("issuer", "result", "reason"))
        for labels, cell in sorted(m._auth.items()):
            auth.add_metric(labels, cell[0])
        yield from (requests, durations, upstream, errors, retries, auth)
        refused = CounterMetricFamily(PREFIX + "connections_refused", "Client connections turned away",
                                      labels=("reason",))
        closed = CounterMetricFamily(PREFIX + "connections_closed", "Client connections the gateway closed "
                                     "before the client did: timeouts, and idle ones reclaimed at the cap",
                                     labels=("reason",))
        for (family, reason), count in m._connection_events.items():
            (refused if family == "connections_refused" else closed).add_metric((reason,), count)
        yield from (refused, closed)
        overloaded = CounterMetricFamily(PREFIX + "overloaded", "Requests refused with 503 overloaded: "
                                         "limits.max_buffered_bytes stayed full while their head or body "
                                         "waited", labels=("waiting_for",))
        for waiting_for, count in m._overloaded.items():
            overloaded.add_metric((waiting_for,), count)
        yield overloaded
        yield GaugeMetricFamily(PREFIX + "buffered_bytes", "Request head and body bytes held in memory now, "
                                "counted against limits.max_buffered_bytes", value=m.buffered_bytes())
        denied = CounterMetricFamily(PREFIX + "run_access_denied", "Run-route requests refused by runs.access "
                                     "or authorization.policy_file (get, cancel and events answered as an "
                                     "unknown run)", labels=("action",))
        for action, count in m.run_access_denied.items():
            denied.add_metric((action,), count)
        yield denied
        limited = CounterMetricFamily(PREFIX + "rate_limited", "Requests refused with 429 by the run-start rate "
                                      "limit", labels=("route",))
        for route, count in sorted(m.rate_limited.items()):
            limited.add_metric((route,), count)
        yield limited
        decisions = CounterMetricFamily(PREFIX + "rate_limit_decisions", "Run-start rate limit decisions, by the "
                                        "backend that decided (redis, or local: configured or the fallback) and "
                                        "the decision (allowed, limited, failed_open, failed_closed)",
                                        labels=("backend", "decision"))
        for (backend, decision), count in sorted(m.rate_decisions.items()):
            decisions.add_metric((backend, decision), count)
        yield decisions
        if m.redis_up is not None:
            redis_errors = CounterMetricFamily(PREFIX + "redis_errors", "Failed Redis calls, by kind (timeout, "
                                               "connection, auth, response)", labels=("kind",))
            for kind, count in sorted(m.redis_errors.items()):
                redis_errors.add_metric((kind,), count)
            yield redis_errors
            yield GaugeMetricFamily(PREFIX + "redis_up", "1 when the last Redis call succeeded, else 0",
                                    value=int(m.redis_up()))
        pool = m.pool
        yield CounterMetricFamily(PREFIX + "upstream_queued", "Requests that waited for a coordinator connection "
                                  "because upstream.max_connections were busy (event streams also for a slot of "
                                  "upstream.stream_share)", value=pool.queued if pool else 0)
        yield CounterMetricFamily(PREFIX + "upstream_shed", "Requests answered 503 run_coordinator_busy after "
                                  "waiting upstream.queue_timeout_s", value=pool.refused if pool else 0)
        yield GaugeMetricFamily(PREFIX + "upstream_waiting", "Requests waiting for a coordinator connection now",
                                value=pool.waiting if pool else 0)
        yield CounterMetricFamily(PREFIX + "upstream_stale_dropped", "Idle coordinator connections dropped "
                                  "because a sibling was reset (a coordinator restart)",
                                  value=pool.dropped_stale if pool else 0)
        yield GaugeMetricFamily(PREFIX + "connections_open", "Client connections open now",
                                value=m.open_connections())
        yield GaugeMetricFamily(PREFIX + "requests_in_flight", "Requests being handled now", value=m.in_flight)
        # Read at scrape time only: a leak of tasks (a stuck stream, a forgotten timer) shows as growth here.
        try:
            alive = len(asyncio.all_tasks())
        except RuntimeError:  # collected outside the event loop (tools, tests): no tasks to count
            alive = 0
        yield GaugeMetricFamily(PREFIX + "asyncio_tasks", "asyncio tasks alive in this process", value=alive)
        yield GaugeMetricFamily(PREFIX + "streams_open", "Event streams open now", value=m.streams_open)
        yield CounterMetricFamily(PREFIX + "stream_lines", "NDJSON lines relayed on event streams",
                                  value=m.stream_lines)
        yield CounterMetricFamily(PREFIX + "stream_bytes", "Bytes relayed on event streams", value=m.stream_bytes)
        yield CounterMetricFamily(PREFIX + "streams_refused", "Event streams answered 429 too_many_streams: "
                                  "over limits.max_streams_per_principal", value=m.streams_refused)
        audit = CounterMetricFamily(PREFIX + "audit_records", "Audit records made, by event and decision "
                                    "(audit.sink not off)", labels=("event", "decision"))
        for pair, count in m.audit_records.items():
            audit.add_metric(pair, count)
        yield audit
        yield CounterMetricFamily(PREFIX + "audit_dropped", "Audit records lost: the queue was full or the sink "
                                  "could not be written (audit.on_full: drop)", value=m.audit_dropped_records)
        yield GaugeMetricFamily(PREFIX + "upstream_stream_connections", "Coordinator connections held by event "
                                "streams now (at most upstream.stream_share of max_connections)",
                                value=pool.streams if pool else 0)


class AuthStateCollector:
    """JWKS and token-cache state, read from the caches themselves at scrape time."""

    def __init__(self, registry_of_jwks, verifier) -> None:
        self._jwks = registry_of_jwks
        self._verifier = verifier

    def collect(self) -> Iterator[Metric]:
        fetches = CounterMetricFamily(PREFIX + "jwks_fetches", "JWKS fetches by result", labels=("issuer", "result"))
        suppressed = CounterMetricFamily(PREFIX + "jwks_refetch_suppressed", "Unknown-kid JWKS refetches "
                                         "refused by the cooldown", labels=("issuer",))
        keys = GaugeMetricFamily(PREFIX + "jwks_keys", "Usable keys held per issuer", labels=("issuer",))
        last = GaugeMetricFamily(PREFIX + "jwks_last_success_timestamp_seconds", "When the JWKS was last "
                                 "fetched successfully (0: never)", labels=("issuer",))
        for jwks in self._jwks:  # per issuer: its refresh scheduler counts fetches, its store holds keys
            fetches.add_metric((jwks.issuer, "success"), jwks.fetches_ok)
            fetches.add_metric((jwks.issuer, "failure"), jwks.fetches_failed)
            suppressed.add_metric((jwks.issuer,), jwks.refetch_suppressed)
            keys.add_metric((jwks.issuer,), jwks.keys.keys_count)
            last.add_metric((jwks.issuer,), jwks.keys.last_success or 0)
        cache = CounterMetricFamily(PREFIX + "token_cache_requests", "Verified-token cache lookups",
                                    labels=("result",))
        cache.add_metric(("hit",), self._verifier.cache_hits)
        cache.add_metric(("miss",), self._verifier.cache_misses)
        yield from (fetches, suppressed, keys, last, cache)
