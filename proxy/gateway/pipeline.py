"""The gateway: builds every part from one GatewayConfig and takes each request through the stages.

`Gateway.handle` reads as the pipeline: route → probes → authenticate → admit
(the run-start rate) → validate (the body) → build identity → forward →
observe. Each stage lives in its own module; this one only wires and
sequences them. The listener (listener.py) calls `handle` once per request,
in order; the request is answered when the gateway calls `request.finish()`.

    gateway = Gateway(load_config(path, os.environ), SystemClock())
    await gateway.start()
    gateway.handle(request)
"""

from __future__ import annotations

import logging
import sys

import aiohttp

from ..arp.answers import Answer, error_answer, json_answer
from ..arp.routes import HEALTH, LIVEZ, METRICS, NOT_FOUND, READYZ, START_RUN, Route, RouteTable
from ..arp.validation import BodyRules
from ..auth import (
    EXEMPT,
    AccessPolicy,
    Authenticator,
    AuthOutcome,
    Identity,
    JwksRegistry,
    TokenExchanger,
    TokenVerifier,
)
from ..edge.listener import Request
from ..observability.accesslog import AccessLog
from ..observability.metrics import AuthStateCollector, GatewayMetrics
from ..observability.observer import RequestObserver
from ..runtime.health import CoordinatorProbe, version_info
from ..settings.config import GatewayConfig
from ..upstream import Upstream
from ..upstream.headers import TrustedProxies
from ..util.clock import Clock
from .ratelimit import RateLimiter
from .streamlimit import StreamLimiter

log = logging.getLogger("proxy.gateway.pipeline")


class Gateway:
    def __init__(self, cfg: GatewayConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.routes = RouteTable(metrics_on_main=cfg.metrics.enabled and cfg.metrics.port == 0)
        self.metrics = GatewayMetrics(i.issuer for i in cfg.auth.issuers) if cfg.metrics.enabled else None
        self.access_log = AccessLog(sys.stdout, log_subject=cfg.logging.log_subject) \
            if cfg.logging.access_log else None
        self.observer = RequestObserver(self.metrics, self.access_log)
        # None without trusted proxies: the client is then always the peer, at no cost per request.
        self.trusted_proxies = TrustedProxies(cfg.listen.trusted_proxies) if cfg.listen.trusted_proxies else None
        self.upstream = Upstream(cfg.upstream, self.metrics, strip_prefix=cfg.auth.identity_header_prefix,
                                 strip_names=(header for _, header in cfg.auth.claim_headers),
                                 trusted=self.trusted_proxies)
        self.probe = CoordinatorProbe(cfg.upstream, clock)
        self.bodies = BodyRules(cfg.limits)
        self.state = "starting"
        self.ops_url: str | None = None
        self.control: aiohttp.ClientSession | None = None
        auth = cfg.auth
        self.registry = JwksRegistry(auth, clock) if auth.mode != "disabled" else None
        verifier = TokenVerifier(auth, self.registry, clock) if self.registry is not None else None
        self.exchanger = TokenExchanger(auth.exchange, clock) if auth.forward_token == "exchange" else None
        self.identity = Identity(auth, self.exchanger)
        self.authn = Authenticator(auth, verifier, AccessPolicy(auth.rules), self.identity)
        if self.metrics is not None and self.registry is not None and verifier is not None:
            self.metrics.watch(AuthStateCollector(self.registry, verifier))
            for jwks in self.registry:
                jwks.on_fetch = lambda _result, seconds, issuer=jwks.issuer: self.metrics.jwks_fetched(issuer, seconds)
        rate = cfg.limits.run_start_rate
        self.run_start_limiter = RateLimiter(per_second=rate.per_second, burst=rate.burst, clock=clock) \
            if rate is not None else None
        self.streams = StreamLimiter(limit=cfg.limits.max_streams_per_principal)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Opens the coordinator pool and control-plane session, fetches keys; never fails on a down IdP."""
        await self.upstream.start()
        self.probe.start()
        if self.metrics is not None:
            self.metrics.pool = self.upstream.pool
        self.control = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.auth.jwks_fetch_timeout_s))
        if self.registry is not None:
            await self.registry.start(self.control)
        if self.exchanger is not None:
            self.exchanger.start(self.control)
        self.state = "ready"

    async def close(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()
        if self.registry is not None:
            await self.registry.close()
        if self.control is not None:
            await self.control.close()
        await self.probe.close()
        await self.upstream.close()

    def begin_drain(self) -> None:
        self.state = "draining"

    def readiness(self) -> list[str]:
        """Why the gateway should not get traffic now; empty when ready."""
        reasons = []
        if self.state != "ready":
            reasons.append(self.state)
        if self.registry is not None and not self.registry.ready:
            reasons.append("jwks_not_loaded")
        return reasons

    # ------------------------------------------------------------------ requests

    def handle(self, request: Request) -> None:
        """Runs the stages in order: route, probes, authenticate, validate, build identity, forward,
        observe. All of them run now when none has to wait (a token verified before, a body that
        came with the head, an idle coordinator connection); otherwise the request continues in a
        task from the first stage that waits."""
        self.observer.begin(request)
        request.route = NOT_FOUND
        trusted = self.trusted_proxies
        if trusted is not None and trusted.trusts(request.conn.peer):
            request.client = trusted.client(request)
        if request.refusal is not None:  # decided by the listener: framing, target, limits
            return self._reply(request, request.refusal)
        route = request.route = self.routes.resolve(request.path) or NOT_FOUND
        if request.preflight and self._is_bypassed_preflight(request, route):
            return self.upstream.forward(request, route, None, b"", self._done)
        if route is NOT_FOUND or request.method not in route.methods or route in _PROBES:
            return self._reply(request, self._route_answer(request, route))
        outcome = EXEMPT if self.authn.is_exempt(request.path) else self.authn.authenticate_now(request, route)
        if (outcome is None or not route.forward or self.identity.waits
                or not (request.complete or request.too_large)):
            request.spawn(self._handle_later(request, route, outcome))
            return None
        request.outcome = outcome
        if outcome.refusal is not None:
            return self._reply(request, outcome.refusal)
        refusal = (self.run_start_limiter is not None and self._admit(request, route, outcome)
                   or route.streaming and self._admit_stream(request, outcome)
                   or self.bodies.before(request, route))
        if refusal is not None:
            return self._reply(request, refusal)
        body = self.bodies.now(request, route)
        if body.__class__ is Answer:
            return self._reply(request, body)
        return self.upstream.forward(request, route, body,  # type: ignore[arg-type]
                                     self.identity.now(request, outcome.principal, outcome.identity), self._done)

    async def _handle_later(self, request: Request, route: Route, outcome: AuthOutcome | None) -> None:
        """The stages of handle(), for a request that has to wait in one of them."""
        if outcome is None:
            outcome = await self.authn.authenticate(request, route, request.request_id)
        request.outcome = outcome
        if outcome.refusal is not None:
            return self._reply(request, outcome.refusal)
        if not route.forward:
            return self._reply(request, json_answer(200, await self.probe.health() if route is HEALTH
                                                    else version_info()))
        refusal = (self._admit(request, route, outcome) or route.streaming and self._admit_stream(request, outcome)
                   or self.bodies.before(request, route))
        if refusal is not None:
            return self._reply(request, refusal)
        body = await self.bodies.later(request, route)
        if body.__class__ is Answer:
            return self._reply(request, body)
        extra = await self.identity.later(request, outcome.principal, outcome.identity)
        if extra.__class__ is Answer:
            return self._reply(request, extra)
        return self.upstream.forward(request, route, body, extra, self._done)  # type: ignore[arg-type]

    def _route_answer(self, request: Request, route: Route) -> Answer:
        """Not found, wrong method, or a probe."""
        if route is NOT_FOUND:
            return error_answer(404, "not_found", "No such route on the Run Gateway", request_id=request.request_id,
                                details={"path": request.path[:256]})
        if request.method not in route.methods:
            return error_answer(405, "method_not_allowed", f"Use {route.allow} on this route",
                                request_id=request.request_id, headers={"Allow": route.allow})
        return self.probe_answer(route)

    def _reply(self, request: Request, answer: Answer) -> None:
        request.respond(answer)
        self._done(request, 0)

    def _done(self, request: Request, failed: int) -> None:
        """The answer is written: observe it, and let the connection go on."""
        if self.streams.holding:
            self.streams.leave(request)
        if not request.finished:
            self.observer.end(request, failed)
            request.finish()

    def abandoned(self, request: Request, status: int) -> None:
        """The client left (499) or answering failed (500) before `_done`."""
        if self.streams.holding:
            self.streams.leave(request)
        self.observer.end(request, status)

    def _admit(self, request: Request, route: Route, outcome: AuthOutcome) -> Answer | None:
        """The run-start rate limit, before the body is read or validated: a flood costs little."""
        limiter = self.run_start_limiter
        if limiter is None or route is not START_RUN:
            return None
        wait = limiter.take(_principal_key(request, outcome))
        if not wait:
            return None
        if self.metrics is not None:
            self.metrics.rate_limited[route.template] = self.metrics.rate_limited.get(route.template, 0) + 1
        retry_after = limiter.retry_after(wait)
        return error_answer(429, "rate_limited", "Too many run starts; retry after the given delay",
                            request_id=request.request_id, retryable=True,
                            details={"retry_after_s": int(retry_after)}, headers={"Retry-After": retry_after})

    def _admit_stream(self, request: Request, outcome: AuthOutcome) -> Answer | None:
        """At most limits.max_streams_per_principal event streams open per principal; counted until
        the request ends however it ends (`_done` or `abandoned`)."""
        if self.streams.enter(request, _principal_key(request, outcome)):
            return None
        if self.metrics is not None:
            self.metrics.streams_refused += 1
        return error_answer(429, "too_many_streams", "Too many event streams open for this caller; close one "
                            "and retry", request_id=request.request_id, retryable=True,
                            details={"max_streams": self.streams.limit})

    def _is_bypassed_preflight(self, request: Request, route: Route) -> bool:
        """CORS preflights carry no credentials by design; forward them only when configured to."""
        return (request.method == "OPTIONS" and request.preflight and route.forward
                and self.cfg.auth.cors_preflight_bypass and not request.has_body)

    def probe_answer(self, route: Route) -> Answer:
        """/livez, /readyz and /metrics: answered without auth, on either listener."""
        if route is LIVEZ:
            return json_answer(200, {"status": "alive"})
        if route is READYZ:
            reasons = self.readiness()
            return json_answer(503 if reasons else 200, {"status": "not_ready" if reasons else "ready",
                                                         "reasons": reasons})
        assert route is METRICS and self.metrics is not None
        body, content_type = self.metrics.exposition()
        return Answer(200, body, content_type.encode())

_PROBES = (LIVEZ, READYZ, METRICS)


def _principal_key(request: Request, outcome: AuthOutcome) -> str:
    """Whom a per-caller limit counts against."""
    principal = outcome.principal
    if principal is None or principal.kind == "anonymous":
        # Anonymous callers share a subject, so each client address counts on its own.
        return "addr\x00" + (request.client or request.conn.peer)
    # The same subject at two issuers is two principals.
    return "sub\x00" + (principal.issuer or "") + "\x00" + principal.subject


