"""Prometheus metrics: what operators scrape from the sidecar and page on.

Labels are bounded by construction: route templates (never raw paths),
configured issuers (never the token's claim), a fixed set of methods and
reasons. The hot path touches only pre-resolved label children; state the
gateway already keeps (JWKS caches, the token cache) is read at scrape time by
a collector instead of being counted twice.

    metrics = GatewayMetrics(issuers=("https://idp",))
    metrics.request(route, "POST", 200, 0.0012)
    body, content_type = metrics.exposition()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .routes import ALL_ROUTES, NOT_FOUND

PREFIX = "arp_gateway_"
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "protocol")
NO_ISSUER = "none"


class GatewayMetrics:
    def __init__(self, issuers: Iterable[str] = (), *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.issuers = frozenset(issuers)
        self._requests = Counter(PREFIX + "requests_total", "Requests answered, by route template, method "
                                 "and status code", ("route", "method", "code"), registry=r)
        self._duration = Histogram(PREFIX + "request_duration_seconds", "Time from request to response "
                                   "headers handed back (streams: until the stream ends)", ("route", "method"),
                                   buckets=REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "Requests being handled now", registry=r)
        self._upstream = Histogram(PREFIX + "upstream_request_duration_seconds", "Time until the Run "
                                   "Coordinator's response headers", ("route", "code"),
                                   buckets=REQUEST_BUCKETS, registry=r)
        self._upstream_errors = Counter(PREFIX + "upstream_errors_total", "Failed exchanges with the Run "
                                        "Coordinator", ("kind",), registry=r)
        self._retries = Counter(PREFIX + "upstream_retries_total", "Retried requests to the Run Coordinator",
                                ("route",), registry=r)
        self._auth = Counter(PREFIX + "auth_decisions_total", "Authentication and authorization decisions",
                             ("issuer", "result", "reason"), registry=r)
        self.streams_open = Gauge(PREFIX + "streams_open", "Event streams open now", registry=r)
        self.stream_lines = Counter(PREFIX + "stream_lines", "NDJSON lines relayed on event streams",
                                    registry=r)
        self.stream_bytes = Counter(PREFIX + "stream_bytes", "Bytes relayed on event streams", registry=r)
        self._jwks_duration = Histogram(PREFIX + "jwks_fetch_duration_seconds", "JWKS (and discovery) fetch "
                                        "time", ("issuer",), registry=r)
        Gauge(PREFIX + "build_info", "Gateway build", ("version",), registry=r).labels(__version__).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._request_children: dict[tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]] = {}
        self._upstream_children: dict[tuple[str, int], Callable[[float], None]] = {}
        self._auth_children: dict[tuple[str, str, str], Callable[[], None]] = {}
        self.upstream_error = {k: self._upstream_errors.labels(k).inc for k in UPSTREAM_ERROR_KINDS}
        self.retry = {t.template: self._retries.labels(t.template).inc for t in ALL_ROUTES if t.forward}
        for template in self.retry:
            self._retries.labels(template)
        for kind in UPSTREAM_ERROR_KINDS:
            self._upstream_errors.labels(kind)
        for issuer in self.issuers:
            self._jwks_duration.labels(issuer)

    # -- hot path: one dict lookup per observation once a label set has been seen

    def request(self, template: str, method: str, status: int, seconds: float) -> None:
        key = (template, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._new_request_children(template, method, status)
        children[0]()
        children[1](seconds)

    def _new_request_children(self, template: str, method: str, status: int):
        if method not in KNOWN_METHODS:
            method = "other"
        if template not in {r.template for r in ALL_ROUTES}:
            template = NOT_FOUND.template
        children = (self._requests.labels(template, method, str(status)).inc,
                    self._duration.labels(template, method).observe)
        self._request_children[(template, method, status)] = children
        return children

    def upstream(self, template: str, status: int, seconds: float) -> None:
        observe = self._upstream_children.get((template, status))
        if observe is None:
            observe = self._upstream.labels(template, str(status)).observe
            self._upstream_children[(template, status)] = observe
        observe(seconds)

    def auth(self, issuer: str | None, result: str, reason: str) -> None:
        key = (issuer or NO_ISSUER, result, reason)
        inc = self._auth_children.get(key)
        if inc is None:
            label = key[0] if key[0] in self.issuers else NO_ISSUER
            inc = self._auth_children[key] = self._auth.labels(label, result, reason).inc
        inc()

    # -- control plane

    def jwks_fetched(self, issuer: str, seconds: float) -> None:
        if issuer in self.issuers:
            self._jwks_duration.labels(issuer).observe(seconds)

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class AuthStateCollector:
    """JWKS and token-cache state, read from the caches themselves at scrape time."""

    def __init__(self, registry_of_jwks, verifier) -> None:
        self._jwks = registry_of_jwks
        self._verifier = verifier

    def collect(self):
        fetches = CounterMetricFamily(PREFIX + "jwks_fetches", "JWKS fetches by result", labels=("issuer", "result"))
        suppressed = CounterMetricFamily(PREFIX + "jwks_refetch_suppressed", "Unknown-kid JWKS refetches "
                                         "refused by the cooldown", labels=("issuer",))
        keys = GaugeMetricFamily(PREFIX + "jwks_keys", "Usable keys held per issuer", labels=("issuer",))
        last = GaugeMetricFamily(PREFIX + "jwks_last_success_timestamp_seconds", "When the JWKS was last "
                                 "fetched successfully (0: never)", labels=("issuer",))
        for jwks in self._jwks:
            fetches.add_metric((jwks.issuer, "success"), jwks.fetches_ok)
            fetches.add_metric((jwks.issuer, "failure"), jwks.fetches_failed)
            suppressed.add_metric((jwks.issuer,), jwks.refetch_suppressed)
            keys.add_metric((jwks.issuer,), jwks.keys_count)
            last.add_metric((jwks.issuer,), jwks.last_success or 0)
        cache = CounterMetricFamily(PREFIX + "token_cache_requests", "Verified-token cache lookups",
                                    labels=("result",))
        cache.add_metric(("hit",), self._verifier.cache_hits)
        cache.add_metric(("miss",), self._verifier.cache_misses)
        yield from (fetches, suppressed, keys, last, cache)
