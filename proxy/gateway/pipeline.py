"""The gateway: builds every part from one GatewayConfig and takes each request through the stages.

The stage order is written once, in `Gateway.__init__` (`self._stages`): route (with the
listener's refusals and the probes) → authenticate → local answers → admit → body → identity
→ forward; observing happens when the answer is done. Each stage is one method that returns
None (go on), an Answer (reply with it and stop; `HANDED`: the stage answers by itself;
`PAUSED`: the stage continues the driver itself, with `proceed`, as the body stage does from
the read that completes a body), or a coroutine that gives one of those once what it waits for
has come. One driver runs the stages inline, in the listener's read callback, and moves into a
task only at the first stage that returns a coroutine: a request that waits for nothing, or only
for its body, is answered without a task or a future.
Each stage's work lives in its own module; this one wires them and keeps the order.

The gateway's own per-request state is an `Exchange` (route, auth outcome, start time, body,
identity lines), which the listener's Request only carries.

    gateway = Gateway(load_config(path, os.environ), SystemClock(), probe, version_info())
    await gateway.start()
    gateway.handle(request)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Protocol

import aiohttp

from ..arp.answers import Answer, error_answer, json_answer
from ..arp.routes import HEALTH, LIVEZ, METRICS, NOT_FOUND, READYZ, START_RUN, Route, RouteTable
from ..arp.runcontext import RunOwner
from ..arp.validation import BodyRules, NodeType
from ..auth import (
    AccessPolicy,
    Authenticator,
    AuthOutcome,
    Identity,
    JwksRegistry,
    Principal,
    TokenExchanger,
    TokenVerifier,
)
from ..edge.errors import BodyIncomplete, BodyTimeout, BodyTooLarge, ClientGone, Overloaded, TrailerTooLarge
from ..edge.request import Request, broken_error
from ..observability.accesslog import AccessLog
from ..observability.audit import AuditTrail
from ..observability.metrics import AuthStateCollector, GatewayMetrics
from ..observability.observer import RequestObserver
from ..settings.config import GatewayConfig
from ..settings.models import BackendError, RateBackend, RateConfig, RateKey
from ..upstream import Upstream
from ..upstream.headers import TrustedProxies
from ..util.clock import Clock
from .ratelimit import RateLimiter, retry_after_s
from .redislimit import RedisStore, SharedRateLimiter, Unavailable
from .runaccess import RunGuard
from .runaudit import RunAudit
from .streamlimit import StreamLimiter

log = logging.getLogger("proxy.gateway.pipeline")

# What a stage gives: None to go on, an Answer to end with (HANDED: the stage answers by itself;
# PAUSED: the stage stops the driver and continues it with `Gateway.proceed` once what it waits
# for has come, like Envoy's StopIteration and continueDecoding), or a coroutine that gives one of those.
Outcome = Answer | None
Result = Outcome | Coroutine[Any, Any, Outcome]
HANDED = Answer(0, b"")
PAUSED = Answer(0, b"")


class HealthProbe(Protocol):
    """The coordinator health probe, which the runtime layer provides (runtime/health.py)."""

    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]:
        """An ARP Health document for `/v1/health`."""

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether the coordinator can take work now, and the check that says so."""


class Exchange:
    """The gateway's state for one request, from `handle` to `observe`."""

    __slots__ = ("request", "route", "outcome", "started", "body", "extra", "reply", "at", "_streams",
                 "_observer")

    def __init__(self, gateway: Gateway, request: Request, started: float) -> None:
        self._streams = gateway.streams
        self._observer = gateway.observer
        self.request = request
        self.route: Route = NOT_FOUND
        self.outcome: AuthOutcome | None = None
        self.started = started
        self.body: bytes | None = None     # what is forwarded: the checked body, if any
        self.extra = b""                   # identity header lines for the coordinator
        self.reply = b""                   # header lines added to the coordinator's answer (RateLimit)
        self.at = 0                        # the stage after a PAUSED one: where `proceed` goes on

    def done(self, request: Request, failed: int) -> str | None:
        """The answer is written: observe it, and let the connection go on. The time its access-log
        line carries, if one was written."""
        request.exchange = None  # no cycle between the two: both go when the connection lets go
        if self._streams.holding:
            self._streams.leave(request)
        if request.finished:
            return None
        stamp = self._observer.end(request, self.route, self.outcome, self.started, failed)
        request.finish()
        return stamp

    def abandoned(self, status: int) -> str | None:
        """The client left (499) or answering failed (500) before `done`."""
        request = self.request
        request.exchange = None
        if self._streams.holding:
            self._streams.leave(request)
        return self._observer.end(request, self.route, self.outcome, self.started, status)


class RunExchange(Exchange):
    """An Exchange that holds a run-route decision: made only when binding, run access, a policy or
    the audit trail is configured, so a gateway without them sets none of it per request."""

    __slots__ = ("run_id", "decision", "reason", "statement_id", "owner", "node_type", "_audit")

    def __init__(self, gateway: Gateway, request: Request, started: float) -> None:
        Exchange.__init__(self, gateway, request, started)   # named: cheaper than super() per request
        # What a run-route decision was, for the audit record (gateway/runaccess.py sets them).
        self.run_id: str | None = None
        self.decision: str | None = None   # "allow" | "deny"
        self.reason: str | None = None
        self.statement_id: str | None = None
        self.owner: RunOwner | None = None  # a run start's, once `bind` has written its caller into it
        self.node_type: NodeType | None = None   # with an audit trail: what a run start's body names
        self._audit: RunAudit | None = gateway.run_audit   # None once the record is made: one per request


class AuditedExchange(RunExchange):
    """A RunExchange whose end is recorded in the audit trail: made only when audit.sink is on."""

    __slots__ = ()

    def done(self, request: Request, failed: int) -> str | None:
        audit = self._audit
        if audit is None or request.finished:
            return Exchange.done(self, request, failed)
        self._audit = None
        # The access log's line first: the record carries the very time that line does.
        stamp = Exchange.done(self, request, failed)
        audit.record(self, failed or request.status or 500, stamp)
        return stamp

    def abandoned(self, status: int) -> str | None:
        audit = self._audit
        self._audit = None
        stamp = Exchange.abandoned(self, status)
        if audit is not None:
            audit.record(self, status, stamp)
        return stamp


class Gateway:
    def __init__(self, cfg: GatewayConfig, clock: Clock, probe: HealthProbe, version: dict[str, Any]) -> None:
        self.cfg = cfg
        self.clock = clock
        self.routes = RouteTable(metrics_on_main=cfg.metrics.enabled and cfg.metrics.port == 0)
        self.metrics = GatewayMetrics(i.issuer for i in cfg.auth.issuers) if cfg.metrics.enabled else None
        self.access_log = AccessLog(sys.stdout, log_subject=cfg.logging.log_subject) \
            if cfg.logging.access_log else None
        self.observer = RequestObserver(self.metrics, self.access_log)
        # None with audit.sink off: no trail, no cost per request.
        self.audit = AuditTrail(cfg.audit, clock, self.metrics) if cfg.audit.sink != "off" else None
        # None without trusted proxies: the client is then always the peer, at no cost per request.
        self.trusted_proxies = TrustedProxies(cfg.listen.trusted_proxies) if cfg.listen.trusted_proxies else None
        self.upstream = Upstream(cfg.upstream, self.metrics, strip_prefix=cfg.auth.identity_header_prefix,
                                 strip_names=(header for _, header in cfg.auth.claim_headers),
                                 trusted=self.trusted_proxies)
        self.probe = probe
        self._version = json_answer(200, version)
        self.bodies = BodyRules(cfg.limits, keep_documents=cfg.audit.sink != "off")
        self.state = "starting"
        self.ops_url: str | None = None
        self.control: aiohttp.ClientSession | None = None
        auth = cfg.auth
        self.registry = JwksRegistry(auth, clock) if auth.mode != "disabled" else None
        verifier = TokenVerifier(auth, self.registry, clock) if self.registry is not None else None
        self.exchanger = TokenExchanger(auth.exchange, clock) if auth.forward_token == "exchange" else None
        self.identity = Identity(auth, self.exchanger)
        self.authn = Authenticator(auth, verifier, AccessPolicy(auth.rules), self.identity)
        # Client certificates asked for at the TLS handshake: their subject and URIs go upstream.
        self.client_certificates = cfg.listen.tls.enabled and cfg.listen.tls.client_auth != "none"
        if self.metrics is not None and self.registry is not None and verifier is not None:
            self.metrics.watch(AuthStateCollector(self.registry, verifier))
            for jwks in self.registry:
                jwks.on_fetch = lambda _result, seconds, issuer=jwks.issuer: self.metrics.jwks_fetched(issuer, seconds)
        rate = cfg.limits.run_start_rate
        self.run_start_limiter = RateLimiter(per_second=rate.per_second, burst=rate.burst, clock=clock) \
            if rate is not None else None
        self._rate_key = _rate_key_function(rate, cfg.runs.tenant_claim)
        # backend: redis only: the fleet-wide limit, with this process's limiter as its fallback.
        self.redis: RedisStore | None = None
        self.shared_limiter: SharedRateLimiter | None = None
        if rate is not None and rate.backend == RateBackend.REDIS and self.run_start_limiter is not None:
            store = self.redis = RedisStore(cfg.redis, clock, self.metrics.redis_errors if self.metrics else None)
            self.shared_limiter = SharedRateLimiter(store, self.run_start_limiter, rate.on_backend_error)
            if self.metrics is not None:
                self.metrics.redis_up = lambda: store.up
        self.streams = StreamLimiter(limit=cfg.limits.max_streams_per_principal)
        self.runs = RunGuard(cfg, self.upstream, self.metrics, handed=HANDED, paused=PAUSED, proceed=self.proceed)
        self.run_audit = RunAudit(self.audit, self.runs) if self.audit is not None else None
        self._exchange: type[Exchange] = AuditedExchange if self.run_audit is not None \
            else RunExchange if self.runs.binds or self.runs.checks else Exchange
        if self.run_audit is not None:
            self._checked = self._checked_kept  # type: ignore[method-assign]
        # The stage order, in its one place. Binding, run authorization and the audit gate are in it
        # only when configured: switched off, they cost nothing per request. With an audit trail the
        # authorize stage also learns each started run's id for its record. With client certificates
        # asked for, the identity stage also passes the certificate on; without, requests never look
        # for one.
        # The run stages take a RunExchange, which is what `handle` makes whenever they are in.
        Stages = tuple[Callable[[Exchange], Result], ...]
        bind: Stages = (self.runs.bind,) if self.runs.binds else ()  # type: ignore[assignment]
        authorize: Stages = (self._authorize,) \
            if self.runs.checks or self.run_audit is not None else ()  # type: ignore[assignment]
        gate: Stages = (self.run_audit.gate,) \
            if self.run_audit is not None and cfg.audit.on_full == "refuse" else ()  # type: ignore[assignment]
        identity = self._identity_and_certificate if self.client_certificates else self._identity
        self._stages: Stages = (
            self._route, self._authenticate, self._local, self._admit, *gate, self._body, *bind, identity,
            *authorize, self._forward)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Opens the coordinator pool and control-plane session, fetches keys; never fails on a down IdP."""
        await self.upstream.start()
        self.probe.start()
        if self.audit is not None:
            self.audit.start()
        if self.metrics is not None:
            self.metrics.pool = self.upstream.pool
        self.control = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.auth.jwks_fetch_timeout_s))
        if self.registry is not None:
            await self.registry.start(self.control)
        if self.exchanger is not None:
            self.exchanger.start(self.control)
        if self.redis is not None:
            await self.redis.start()  # never fails: a Redis that is down means the fallback
        self.state = "ready"

    async def close(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()
        if self.audit is not None:
            await self.audit.close()   # after the listener's drain: the records of in-flight requests are queued
        if self.registry is not None:
            await self.registry.close()
        if self.control is not None:
            await self.control.close()
        await self.probe.close()
        await self.upstream.close()
        if self.redis is not None:
            await self.redis.close()

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
        """The driver: the stages in order, inline, until one answers or has to wait."""
        ex = request.exchange = self._exchange(self, request, self.observer.begin())
        self._drive(ex, 0)

    def _drive(self, ex: Exchange, i: int) -> None:
        # A for loop over the tuple: cheaper per stage than indexing it, and a request starts at 0.
        for stage in self._stages[i:] if i else self._stages:
            i += 1
            result = stage(ex)
            if result is None:
                continue
            if result.__class__ is not Answer:  # a stage has to wait: the rest runs in a task
                ex.request.spawn(self._resume(ex, result, i))  # type: ignore[arg-type]
            elif result is PAUSED:
                ex.at = i
            elif result is not HANDED:
                self._reply(ex, result)
            return

    def proceed(self, ex: Exchange, result: Outcome) -> None:
        """The driver again, after a PAUSED stage, with that stage's outcome."""
        if result is None:
            self._drive(ex, ex.at)
        elif result is not HANDED:
            self._reply(ex, result)

    async def _resume(self, ex: Exchange, pending: Coroutine[Any, Any, Outcome], i: int) -> None:
        """The driver, from the first stage that waits: the same stages, awaiting any that wait."""
        result = await pending
        stages = self._stages
        n = len(stages)
        while result is None and i < n:
            step = stages[i](ex)
            i += 1
            result = step if step is None or step.__class__ is Answer else await step  # type: ignore[misc]
        if result is PAUSED:
            ex.at = i
        elif result is not None and result is not HANDED:
            self._reply(ex, result)

    # ------------------------------------------------------------------ the stages, in order

    def _route(self, ex: Exchange) -> Result:
        """The client address, the listener's refusals, the route; 404, 405 and the probes; CORS
        preflights forwarded unauthenticated when configured."""
        request = ex.request
        trusted = self.trusted_proxies
        if trusted is not None and trusted.trusts(request.conn.peer):
            request.client = trusted.client(request)
        if request.refusal is not None:  # decided by the listener: framing, target, limits
            return request.refusal
        route = ex.route = self.routes.resolve(request.path) or NOT_FOUND
        if request.preflight and self._is_bypassed_preflight(request, route):
            return self._forward(ex)
        if route is NOT_FOUND or request.method not in route.methods or route in _PROBES:
            return self._route_answer(request, route)
        return None

    def _authenticate(self, ex: Exchange) -> Result:
        decided = self.authn.authenticate(ex.request, ex.route)
        if decided.__class__ is AuthOutcome:
            ex.outcome = decided
            return decided.refusal
        return self._authenticated(ex, decided)  # type: ignore[arg-type]

    async def _authenticated(self, ex: Exchange, pending: Coroutine[Any, Any, AuthOutcome]) -> Outcome:
        outcome = ex.outcome = await pending
        return outcome.refusal

    def _local(self, ex: Exchange) -> Result:
        """/v1/health and /v1/version, answered by the gateway after authentication."""
        route = ex.route
        if route.forward:
            return None
        if route is HEALTH:
            return self._health()
        return self._version

    async def _health(self) -> Outcome:
        return json_answer(200, await self.probe.health())

    def _admit(self, ex: Exchange) -> Result:
        """The run-start rate, the event-stream count, then what refuses a body before it is read:
        all before the body, so a flood costs little."""
        request, route = ex.request, ex.route
        outcome = ex.outcome
        assert outcome is not None
        if self.run_start_limiter is not None and route is START_RUN:
            if self.shared_limiter is not None:
                return self._rate_shared(ex, outcome)  # the one stage here that waits, and only for Redis
            refused = self._rate(ex, outcome)
            if refused is not None:
                return refused
        return (route.streaming and self._admit_stream(request, outcome)
                or self.bodies.before(request, route))

    def _body(self, ex: Exchange) -> Result:
        """The body, whole; one still arriving pauses the driver without a task (`100 Continue`
        first if the client waits for it), and the connection continues it from its read."""
        request = ex.request
        if request.complete or request.too_large:
            try:
                raw = request.body_now()
            except BodyTooLarge as exc:
                return self._body_refusal(request, exc)
            return self._checked(ex, raw)
        if request.broken:
            return self._body_refusal(request, broken_error(request.broken))
        # False: the client is gone, and its connection reports the request as abandoned.
        return PAUSED if request.body_later(self._body_came) else HANDED

    def _body_came(self, request: Request, error: BaseException | None) -> None:
        ex = request.exchange
        if not isinstance(ex, Exchange) or error.__class__ is ClientGone:
            return  # the client left: its connection has reported it (499)
        # With no error the body is whole (or past the limit), so _body takes it now.
        self.proceed(ex, self._body(ex) if error is None else self._body_refusal(request, error))  # type: ignore[arg-type]

    def _checked(self, ex: Exchange, raw: bytes) -> Outcome:
        body = self.bodies.checked(ex.request, ex.route, raw)
        if body.__class__ is Answer:
            return body
        ex.body = body  # type: ignore[assignment]
        return None

    def _checked_kept(self, ex: Exchange, raw: bytes) -> Outcome:
        """_checked, keeping the node type a run start names on the (audited) exchange."""
        body = self.bodies.checked(ex.request, ex.route, raw)
        if ex.route is START_RUN:
            ex.node_type = self.bodies.node_type  # type: ignore[attr-defined]
        if body.__class__ is Answer:
            return body
        ex.body = body  # type: ignore[assignment]
        return None

    def _body_refusal(self, request: Request, exc: BaseException) -> Answer:
        """413 past the limit, 408 past the body timeout, 503 when the buffer budget stayed full that
        long, 431 for an oversized trailer section, 400 when the body ends early or breaks."""
        rid = request.request_id
        if isinstance(exc, BodyTooLarge):
            return self.bodies.too_large(rid)
        if isinstance(exc, BodyTimeout):
            return error_answer(408, "request_timeout", "The request body did not arrive in time", request_id=rid,
                                details={"body_timeout_s": self.bodies.body_timeout_s})
        if isinstance(exc, Overloaded):
            return error_answer(503, "overloaded", "The gateway holds too many request bytes; retry shortly",
                                request_id=rid, retryable=True, details={"reason": "buffer_budget_full"})
        if isinstance(exc, TrailerTooLarge):
            return error_answer(431, "request_header_fields_too_large", "The request trailer section is too large",
                                request_id=rid, details={"reason": "trailer_too_large"})
        assert isinstance(exc, BodyIncomplete)
        return error_answer(400, "invalid_request", "The request body is incomplete or its framing is invalid",
                            request_id=rid, details={"reason": exc.reason})

    def _identity(self, ex: Exchange) -> Result:
        """What the coordinator learns about the caller; with token exchange, after the STS answers."""
        outcome = ex.outcome
        assert outcome is not None
        principal = outcome.principal
        ex.extra = self.identity.now(ex.request, principal, outcome.identity)
        if self.identity.waits and principal is not None:
            return self._exchanged(ex, principal)
        return None

    def _identity_and_certificate(self, ex: Exchange) -> Result:
        """The identity stage, with the client certificate's subject and URIs added (listen.tls with
        client certificates)."""
        outcome = ex.outcome
        assert outcome is not None
        certificate = ex.request.client_certificate
        if outcome.principal is None or certificate is None:
            return self._identity(ex)
        ex.extra = self.identity.now(ex.request, outcome.principal, outcome.identity) + \
            self.identity.certificate(certificate)
        if self.identity.waits:
            return self._exchanged(ex, outcome.principal)
        return None

    async def _exchanged(self, ex: Exchange, principal: Principal) -> Outcome:
        line = await self.identity.exchanged(ex.request, principal)
        if line.__class__ is Answer:
            return line
        ex.extra += line  # type: ignore[operator]
        return None

    def _authorize(self, ex: RunExchange) -> Result:
        """Who may act on this run (runs.access, authorization.policy_file); a run start allowed
        here is forwarded with its answer peeked, to learn the new run's id and owner."""
        runs = self.runs
        if ex.route is not START_RUN:
            return runs.authorize(ex)
        if runs.policy is not None:
            refused = runs.authorize(ex)
            if refused is not None:
                return refused
        self.upstream.forward(ex.request, START_RUN, ex.body, ex.extra, ex.done, ex.reply, partial(runs.peek, ex))
        return HANDED

    def _forward(self, ex: Exchange) -> Result:
        self.upstream.forward(ex.request, ex.route, ex.body, ex.extra, ex.done, ex.reply)
        return HANDED

    # ------------------------------------------------------------------ answers and their end

    def _route_answer(self, request: Request, route: Route) -> Answer:
        """Not found, wrong method, or a probe."""
        if route is NOT_FOUND:
            return error_answer(404, "not_found", "No such route on the Run Gateway", request_id=request.request_id,
                                details={"path": request.path[:256]})
        if request.method not in route.methods:
            return error_answer(405, "method_not_allowed", f"Use {route.allow} on this route",
                                request_id=request.request_id, headers={"Allow": route.allow})
        return self.probe_answer(route)

    def _reply(self, ex: Exchange, answer: Answer) -> None:
        request = ex.request
        request.respond(answer)
        ex.done(request, 0)

    def abandoned(self, request: Request, status: int) -> None:
        """The client left (499) or answering failed (500) before the answer was done; nothing
        more when it was (the exchange is then gone), so no request is observed twice."""
        if request.exchange is not None:
            request.exchange.abandoned(status)

    def _rate(self, ex: Exchange, outcome: AuthOutcome) -> Answer | None:
        """The run-start rate limit in this process (backend: local)."""
        limiter = self.run_start_limiter
        assert limiter is not None
        allowed, us = limiter.decide(self._rate_key(ex.request, outcome))
        return self._rate_decided(ex, "local", allowed, us)

    async def _rate_shared(self, ex: Exchange, outcome: AuthOutcome) -> Outcome:
        """The run-start rate limit in Redis (backend: redis), then the rest of the admit stage."""
        shared = self.shared_limiter
        assert shared is not None
        request, route = ex.request, ex.route
        try:
            backend, allowed, us = await shared.decide(self._rate_key(request, outcome))
        except Unavailable:
            if shared.on_error == BackendError.CLOSED:
                self._count_decision("redis", "failed_closed")
                return error_answer(503, "rate_limiter_unavailable", "The run-start rate limit cannot be checked "
                                    "now; retry shortly", request_id=request.request_id, retryable=True,
                                    details={"reason": "redis_unavailable"},
                                    headers={"Retry-After": str(retry_after_s(int(shared.store.reopens_in_s()
                                                                                  * 1_000_000)))})
            self._count_decision("redis", "failed_open")
        else:
            refused = self._rate_decided(ex, backend, allowed, us)
            if refused is not None:
                return refused
        return (route.streaming and self._admit_stream(request, outcome)
                or self.bodies.before(request, route))

    def _count_decision(self, backend: str, decision: str) -> None:
        if self.metrics is not None:
            decisions = self.metrics.rate_decisions
            decisions[(backend, decision)] = decisions.get((backend, decision), 0) + 1

    def _rate_decided(self, ex: Exchange, backend: str, allowed: bool, us: int) -> Answer | None:
        """None (go on, with the RateLimit fields for the coordinator's answer) or the 429; the
        RateLimit fields agree with Retry-After (draft-ietf-httpapi-ratelimit-headers)."""
        limiter = self.run_start_limiter
        assert limiter is not None
        fields = limiter.policy.headers(allowed, us)
        if allowed:
            self._count_decision(backend, "allowed")
            ex.reply = "".join(f"{name}: {value}\r\n" for name, value in fields).encode()
            return None
        self._count_decision(backend, "limited")
        if self.metrics is not None:
            template = ex.route.template
            self.metrics.rate_limited[template] = self.metrics.rate_limited.get(template, 0) + 1
        retry_after = retry_after_s(us)
        return error_answer(429, "rate_limited", "Too many run starts; retry after the given delay",
                            request_id=ex.request.request_id, retryable=True,
                            details={"retry_after_s": retry_after},
                            headers={"Retry-After": str(retry_after), **dict(fields)})

    def _admit_stream(self, request: Request, outcome: AuthOutcome) -> Answer | None:
        """At most limits.max_streams_per_principal event streams open per principal; counted until
        the request ends however it ends (`done` or `abandoned`)."""
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


def _rate_key_function(rate: RateConfig | None, runs_tenant_claim: str | None) -> Callable[[Request, AuthOutcome], str]:
    """Whom the run-start limit counts against: limits.run_start_rate.key; a tenant is named by the
    limit's own tenant_claim, else by the one runs bind into each run."""
    if rate is None or rate.key == RateKey.SUBJECT:
        return _principal_key
    # A claim read from a verified token; only a non-empty string or a number names a group.
    claims = (rate.tenant_claim or runs_tenant_claim,) if rate.key == RateKey.TENANT else ("client_id", "azp")
    label = "tenant\x00" if rate.key == RateKey.TENANT else "client\x00"

    def key(request: Request, outcome: AuthOutcome) -> str:
        principal = outcome.principal
        if principal is not None and principal.kind != "anonymous":
            for claim in claims:
                value = principal.claims.get(claim)  # type: ignore[arg-type]
                if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                    return label + (principal.issuer or "") + "\x00" + str(value)
        return _principal_key(request, outcome)  # no such claim: the caller counts alone

    return key


def _principal_key(request: Request, outcome: AuthOutcome) -> str:
    """Whom a per-caller limit counts against."""
    principal = outcome.principal
    if principal is None or principal.kind == "anonymous":
        # Anonymous callers share a subject, so each client address counts on its own.
        return "addr\x00" + (request.client or request.conn.peer)
    # The same subject at two issuers is two principals.
    return "sub\x00" + (principal.issuer or "") + "\x00" + principal.subject


