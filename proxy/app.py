"""Wiring: builds every part from one GatewayConfig and routes each request through them.

One handler does the dispatch so that the hot path reads top to bottom:
route → probes → authenticate → validate → forward → observe. The listener
(listener.py) calls it once per request, in order, and it answers the request
itself.

    gateway = Gateway(load_config(path, os.environ), SystemClock())
    await gateway.start()
    await gateway.handle(request)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import aiohttp

from .access import AccessPolicy
from .accesslog import AccessLog
from .answers import Answer, error_answer, json_answer
from .auth import EXEMPT, Authenticator, AuthOutcome
from .clock import Clock
from .config import GatewayConfig
from .exchange import ExchangeFailed, TokenExchanger
from .forwarding import Upstream
from .health import CoordinatorProbe, version_info
from .jwks_refresh import JwksRegistry
from .listener import BodyIncomplete, BodyTimeout, BodyTooLarge, Request
from .metrics import AuthStateCollector, GatewayMetrics
from .ratelimit import RateLimiter
from .routes import HEALTH, LIVEZ, METRICS, NOT_FOUND, READYZ, START_RUN, Route, RouteTable
from .tokens import TokenVerifier
from .validation import load_run_start_validator

log = logging.getLogger("proxy.app")
_JSON_TYPES = (b"application/json",)
_IDENTITY = (None, b"identity")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with any keyword argument builds a new decoder per call.
_DECODE = json.JSONDecoder(parse_constant=_reject_constant).decode


class Gateway:
    def __init__(self, cfg: GatewayConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.routes = RouteTable(metrics_on_main=cfg.metrics.enabled and cfg.metrics.port == 0)
        self.metrics = GatewayMetrics(i.issuer for i in cfg.auth.issuers) if cfg.metrics.enabled else None
        self.access_log = AccessLog(sys.stdout, log_subject=cfg.logging.log_subject) \
            if cfg.logging.access_log else None
        self.upstream = Upstream(cfg.upstream, self.metrics, strip_prefix=cfg.auth.identity_header_prefix,
                                 strip_names=(header for _, header in cfg.auth.claim_headers))
        self.probe = CoordinatorProbe(self.upstream, clock)
        self.validate_run_start = load_run_start_validator()
        self.state = "starting"
        self.ops_url: str | None = None
        self.control: aiohttp.ClientSession | None = None
        auth = cfg.auth
        self.registry = JwksRegistry(auth, clock) if auth.mode != "disabled" else None
        verifier = TokenVerifier(auth, self.registry, clock) if self.registry is not None else None
        self.authn = Authenticator(auth, verifier, AccessPolicy(auth.rules))
        if self.metrics is not None and self.registry is not None and verifier is not None:
            self.metrics.watch(AuthStateCollector(self.registry, verifier))
            for jwks in self.registry:
                jwks.on_fetch = lambda _result, seconds, issuer=jwks.issuer: self.metrics.jwks_fetched(issuer, seconds)
        self.exchanger = TokenExchanger(auth.exchange, clock) if auth.forward_token == "exchange" else None
        rate = cfg.limits.run_start_rate
        self.run_start_limiter = RateLimiter(per_second=rate.per_second, burst=rate.burst, clock=clock) \
            if rate is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Opens the coordinator pool and control-plane session, fetches keys; never fails on a down IdP."""
        await self.upstream.start()
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

    async def handle(self, request: Request) -> None:
        """One request, stage by stage; every path ends in exactly one answer and one observation."""
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.in_flight += 1
        route = NOT_FOUND
        outcome: AuthOutcome | None = None
        failed = 0
        try:
            if request.refusal is not None:  # decided by the listener: framing, target, limits
                request.respond(request.refusal)
                return
            route = self.routes.resolve(request.path) or NOT_FOUND
            if route is NOT_FOUND:
                request.respond(error_answer(404, "not_found", "No such route on the Run Gateway",
                                             request_id=request.request_id,
                                             details={"path": request.path[:256]}))
            elif request.method not in route.methods:
                if self._is_bypassed_preflight(request, route):
                    await self.upstream.forward(request, route, None, b"")
                else:
                    request.respond(error_answer(405, "method_not_allowed", f"Use {route.allow} on this route",
                                                 request_id=request.request_id, headers={"Allow": route.allow}))
            elif route in _PROBES:
                request.respond(self.probe_answer(route))
            else:
                outcome = EXEMPT if self.authn.is_exempt(request.path) else await self.authn.authenticate(
                    request, route, request.request_id)
                if outcome.refusal is not None:
                    request.respond(outcome.refusal)
                elif not route.forward:
                    request.respond(json_answer(200, await self.probe.health() if route is HEALTH
                                                else version_info()))
                else:
                    await self._forward(request, route, outcome)
        except asyncio.CancelledError:
            failed = 499  # the client went away before an answer (nginx's convention)
            raise
        except Exception:
            failed = 500
            raise
        finally:
            self._observe(request, route, outcome, failed, time.perf_counter() - started)

    async def _forward(self, request: Request, route: Route, outcome: AuthOutcome) -> None:
        if route is START_RUN and self.run_start_limiter is not None:
            # Before the body is read or validated: a flood costs the gateway as little as possible.
            limited = self._rate_limited(request, route, outcome)
            if limited is not None:
                request.respond(limited)
                return
        body = await self._read_body(request, route)
        if body.__class__ is Answer:  # a refusal (isinstance would take the slow ABC path)
            request.respond(body)  # type: ignore[arg-type]
            return
        extra = await self._identity(request, outcome)
        if extra.__class__ is Answer:
            request.respond(extra)  # type: ignore[arg-type]
            return
        await self.upstream.forward(request, route, body, extra)  # type: ignore[arg-type]

    def _rate_limited(self, request: Request, route: Route, outcome: AuthOutcome) -> Answer | None:
        limiter = self.run_start_limiter
        assert limiter is not None
        principal = outcome.principal
        if principal is None or principal.kind == "anonymous":
            # Anonymous callers share a subject, so each client address gets its own bucket.
            key = "addr\x00" + request.conn.peer
        else:
            # The same subject at two issuers is two principals.
            key = "sub\x00" + (principal.issuer or "") + "\x00" + principal.subject
        wait = limiter.take(key)
        if not wait:
            return None
        if self.metrics is not None:
            self.metrics.rate_limited[route.template] = self.metrics.rate_limited.get(route.template, 0) + 1
        retry_after = limiter.retry_after(wait)
        return error_answer(429, "rate_limited", "Too many run starts; retry after the given delay",
                            request_id=request.request_id, retryable=True,
                            details={"retry_after_s": int(retry_after)}, headers={"Retry-After": retry_after})

    def _observe(self, request: Request, route: Route, outcome: AuthOutcome | None, failed: int,
                 seconds: float) -> None:
        """Metrics and the access log, once per request, whatever happened to it."""
        status = failed or request.status or 500
        principal = outcome.principal if outcome is not None else None
        if self.metrics is not None:
            self.metrics.request(route.template, request.method, status, seconds,
                                 None if outcome is None or outcome is EXEMPT else
                                 (principal.issuer if principal else None, outcome.result, outcome.reason))
        if self.access_log is not None:
            self.access_log.record(request.request_id, request.method or "-", route.template, status, seconds,
                                   request.upstream_s, request.body_size, request.bytes_out,
                                   outcome.result if outcome else "none", outcome.reason if outcome else "",
                                   principal.subject if principal else None)

    def _is_bypassed_preflight(self, request: Request, route: Route) -> bool:
        """CORS preflights carry no credentials by design; forward them only when configured to."""
        return (request.method == "OPTIONS" and route.forward and self.cfg.auth.cors_preflight_bypass
                and request.preflight and not request.has_body)

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

    # ------------------------------------------------------------------ validate

    async def _read_body(self, request: Request, route: Route) -> bytes | None | Answer:
        """The body to forward, whole and checked; or the refusal. Only POST routes take one."""
        rid = request.request_id
        if request.method != "POST":
            # An empty chunked body is no body; anything else on a GET route is refused.
            body = await self._receive(request) if request.chunked else b""
            if body.__class__ is Answer:
                return body
            if request.content_length or body:
                return error_answer(400, "invalid_request", f"{request.method} {route.template} takes no body",
                                    request_id=rid, details={"reason": "unexpected_body"})
            return None
        if route is START_RUN:
            ctype = (request.content_type or b"").partition(b";")[0].strip().lower()
            if ctype not in _JSON_TYPES and not (ctype.startswith(b"application/") and ctype.endswith(b"+json")):
                return error_answer(415, "unsupported_media_type", "Send the run start body as application/json",
                                    request_id=rid, details={"content_type": ctype[:100].decode("latin-1")})
            coding = request.content_encoding
            if coding is not None and coding.strip().lower() != b"identity":
                # The edge validates the run start, and it decompresses nothing.
                return error_answer(415, "unsupported_media_type", "Send the run start body uncompressed",
                                    request_id=rid, details={"content_encoding": coding[:100].decode("latin-1")})
        body = await self._receive(request)
        if body.__class__ is Answer or route is not START_RUN:
            return body
        problems = self._run_start_problems(body)  # type: ignore[arg-type]
        if problems:
            return error_answer(400, "invalid_request", "The run start request is not a valid RunStartRequest",
                                request_id=rid, details={"errors": problems})
        return body

    async def _receive(self, request: Request) -> bytes | Answer:
        """The whole body within limits.max_body_bytes and limits.body_timeout_s, or the refusal."""
        rid = request.request_id
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit, rid)  # refused before `100 Continue`: the client never sends it
        try:
            return await request.read_body()
        except BodyTooLarge:
            return _too_large(limit, rid)
        except BodyTimeout:
            return error_answer(408, "request_timeout", "The request body did not arrive in time",
                                request_id=rid, details={"body_timeout_s": self.cfg.limits.body_timeout_s})
        except BodyIncomplete as exc:
            return error_answer(400, "invalid_request", "The request body is incomplete or its framing is invalid",
                                request_id=rid, details={"reason": exc.reason})

    def _run_start_problems(self, body: bytes) -> list[dict[str, str]]:
        try:
            document = _DECODE(body.decode("utf-8"))  # RFC 8259: JSON between systems is UTF-8
        except (ValueError, RecursionError) as exc:
            problem = {"path": "$", "message": f"not valid JSON: {type(exc).__name__}"}
            if isinstance(exc, json.JSONDecodeError):
                problem["message"] = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            return [problem]
        return self.validate_run_start(document)

    # ------------------------------------------------------------------ identity

    async def _identity(self, request: Request, outcome: AuthOutcome) -> bytes | Answer:
        """Every header line the coordinator learns about the caller: decided here and nowhere else."""
        principal = outcome.principal
        if principal is None:
            return b""
        extra = outcome.identity
        mode = self.cfg.auth.forward_token
        if mode == "exchange":
            try:
                token = await self.exchanger.token_for(principal.token)  # type: ignore[union-attr]
            except ExchangeFailed as exc:
                return error_answer(502, "token_exchange_failed", "Could not obtain a token for the Run Coordinator",
                                    request_id=request.request_id, retryable=exc.retryable,
                                    details={"reason": exc.reason})
            extra += b"Authorization: Bearer " + token.encode() + b"\r\n"
        elif mode == "passthrough" and principal.kind == "dev" and len(request.authorization) == 1:
            # With auth disabled nothing was verified, but a coordinator may still check the token itself.
            extra += b"Authorization: " + request.authorization[0] + b"\r\n"
        return extra


_PROBES = (LIVEZ, READYZ, METRICS)


def _too_large(limit: int, rid: str) -> Answer:
    return error_answer(413, "payload_too_large", f"The request body exceeds {limit} bytes",
                        request_id=rid, details={"max_body_bytes": limit})
