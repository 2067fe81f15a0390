"""Wiring: builds every part from one GatewayConfig and routes each request through them.

One handler does the dispatch so that the hot path reads top to bottom:
route → probes → auth → edge validation → forward. It is served by aiohttp's
low-level `web.Server` (see server.py): an `Application` and its router
would cost ~15 µs per request to reach a single catch-all handler.

    gateway = Gateway(load_config(path, os.environ), SystemClock())
    await gateway.start()
    response = await gateway.handle(request)
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time

import aiohttp
from aiohttp import web

from .access import AccessPolicy
from .accesslog import AccessLog
from .auth import EXEMPT, Authenticator, AuthOutcome
from .clock import Clock
from .config import GatewayConfig
from .errors import JSON_CONTENT_TYPE, error_response
from .exchange import ExchangeFailed, TokenExchanger
from .forwarding import BYTES_OUT, UPSTREAM_SECONDS, RelayedResponse, Upstream
from .health import CoordinatorProbe, version_info
from .jwks import JwksRegistry
from .metrics import AuthStateCollector, GatewayMetrics
from .routes import HEALTH, LIVEZ, METRICS, NOT_FOUND, READYZ, START_RUN, Route, RouteTable
from .tokens import TokenVerifier
from .validation import load_run_start_validator

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON_TYPES = ("application/json",)


def _request_id(given: str | None) -> str:
    # A client-chosen id is kept for correlation, but only if it is safe to log and echo.
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    # Correlation ids need uniqueness, not secrecy: no urandom syscall per request.
    return "%032x" % random.getrandbits(128)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with any keyword argument builds a new decoder per call.
_DECODE = json.JSONDecoder(parse_constant=_reject_constant).decode


def _json(status: int, body: dict) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=JSON_CONTENT_TYPE)


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

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Opens the coordinator pool and control-plane session, fetches keys; never fails on a down IdP."""
        await self.upstream.start()
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = _request_id(request.headers.get("X-Request-ID"))
        raw_path = request.raw_path.partition("?")[0]
        route = self.routes.resolve(raw_path) or NOT_FOUND
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight += 1
        outcome: AuthOutcome | None = None
        response: web.StreamResponse | None = None
        failed = 0
        try:
            if route is NOT_FOUND:
                response = error_response(404, "not_found", "No such route on the Run Gateway",
                                          request_id=rid, details={"path": raw_path[:256]})
            elif request.method not in route.methods:
                if self._is_bypassed_preflight(request, route):
                    response = await self.upstream.forward(request, route, None, b"", rid)
                else:
                    response = error_response(405, "method_not_allowed", f"Use {route.allow} on this route",
                                              request_id=rid, headers={"Allow": route.allow})
            elif route.forward:
                outcome = EXEMPT if self.authn.is_exempt(raw_path) else await self.authn.authenticate(
                    request, route, rid)
                response = outcome.refusal or await self._forward(request, route, outcome, rid)
            else:
                response, outcome = await self.local(request, route, raw_path, rid)
            if not response.prepared and response.__class__ is not RelayedResponse:  # those carry it
                response.headers["X-Request-ID"] = rid
            return response
        except asyncio.CancelledError:
            failed = 499  # the client went away before an answer (nginx's convention)
            raise
        except Exception:
            failed = 500
            raise
        finally:
            self._observe(request, route, rid, response, failed, outcome, time.perf_counter() - started)

    def _observe(self, request: web.Request, route: Route, rid: str, response: web.StreamResponse | None,
                 failed: int, outcome: AuthOutcome | None, seconds: float) -> None:
        """Metrics and the access log, once per request, whatever happened to it."""
        status = failed or (response.status if response is not None else 500)
        principal = outcome.principal if outcome is not None else None
        if self.metrics is not None:
            self.metrics.request(route.template, request.method, status, seconds,
                                 None if outcome is None or outcome is EXEMPT else
                                 (principal.issuer if principal else None, outcome.result, outcome.reason))
        if self.access_log is not None:
            upstream_s = response.get(UPSTREAM_SECONDS) if response is not None else None
            if response is None:
                bytes_out = 0
            elif isinstance(response, web.Response):
                bytes_out = response.content_length or 0
            else:
                bytes_out = response.get(BYTES_OUT, 0)
            self.access_log.record(rid, request.method, route.template, status, seconds, upstream_s,
                                   request.content_length or 0, bytes_out,
                                   outcome.result if outcome else "none", outcome.reason if outcome else "",
                                   principal.subject if principal else None)

    def _is_bypassed_preflight(self, request: web.Request, route: Route) -> bool:
        """CORS preflights carry no credentials by design; forward them only when configured to."""
        return (request.method == "OPTIONS" and route.forward and self.cfg.auth.cors_preflight_bypass
                and "Access-Control-Request-Method" in request.headers)

    async def local(self, request: web.Request, route: Route, raw_path: str,
                     rid: str) -> tuple[web.StreamResponse, AuthOutcome | None]:
        if route is LIVEZ:
            return _json(200, {"status": "alive"}), None
        if route is READYZ:
            reasons = self.readiness()
            return _json(503 if reasons else 200, {"status": "not_ready" if reasons else "ready",
                                                   "reasons": reasons}), None
        if route is METRICS:
            assert self.metrics is not None
            body, content_type = self.metrics.exposition()
            return web.Response(body=body, headers={"Content-Type": content_type}), None
        outcome = None
        if not self.authn.is_exempt(raw_path):
            outcome = await self.authn.authenticate(request, route, rid)
            if outcome.refusal is not None:
                return outcome.refusal, outcome
        return _json(200, await self.probe.health() if route is HEALTH else version_info()), outcome

    async def _forward(self, request: web.Request, route: Route, outcome: AuthOutcome,
                       rid: str) -> web.StreamResponse:
        body = None
        if route is START_RUN:
            checked = await self._read_run_start(request, rid)
            if checked.__class__ is not bytes:  # a refusal (isinstance would take the slow ABC path)
                return checked  # type: ignore[return-value]
            body = checked
        extra = b""
        principal = outcome.principal
        if principal is not None:
            extra = self.authn.upstream_headers(principal)
            mode = self.cfg.auth.forward_token
            if mode == "exchange":
                try:
                    token = await self.exchanger.token_for(principal.token)  # type: ignore[union-attr]
                except ExchangeFailed as exc:
                    return error_response(502, "token_exchange_failed",
                                          "Could not obtain a token for the Run Coordinator", request_id=rid,
                                          retryable=exc.retryable, details={"reason": exc.reason})
                extra += b"Authorization: Bearer " + token.encode() + b"\r\n"
            elif mode == "passthrough" and principal.kind == "dev" and "Authorization" in request.headers:
                # With auth disabled nothing was verified, but a coordinator may still check the token itself.
                given = request.headers["Authorization"].encode("utf-8", "surrogateescape")
                extra += b"Authorization: " + given + b"\r\n"
        if body is None and request.body_exists:
            await _continue(request)
        return await self.upstream.forward(request, route, body, extra, rid)

    async def _read_run_start(self, request: web.Request, rid: str) -> bytes | web.Response:
        ctype = request.content_type
        if ctype not in _JSON_TYPES and not (ctype.startswith("application/") and ctype.endswith("+json")):
            return error_response(415, "unsupported_media_type", "Send the run start body as application/json",
                                  request_id=rid, details={"content_type": ctype[:100]})
        limit = self.cfg.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return _too_large(limit, rid)
        await _continue(request)
        if length is not None:
            # A small body usually arrived with the headers: take it without a wait.
            body = request.content.read_nowait(length)
            if len(body) < length:
                try:
                    body += await request.content.readexactly(length - len(body))
                except asyncio.IncompleteReadError:
                    return _invalid([{"path": "$", "message": "the body ended before Content-Length bytes"}], rid)
        else:
            body = await _read_limited(request.content, limit)
            if body is None:
                return _too_large(limit, rid)
        try:
            document = _DECODE(body.decode("utf-8"))  # RFC 8259: JSON between systems is UTF-8
        except (ValueError, RecursionError) as exc:
            problem = {"path": "$", "message": f"not valid JSON: {type(exc).__name__}"}
            if isinstance(exc, json.JSONDecodeError):
                problem["message"] = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            return _invalid([problem], rid)
        problems = self.validate_run_start(document)
        if problems:
            return _invalid(problems, rid)
        return body


async def _continue(request: web.Request) -> None:
    """Answers `Expect: 100-continue` once the body is wanted: only after auth and size checks passed,
    so a refused client never sends it. Without this such clients wait a second before sending."""
    if request.version == aiohttp.HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response


def _invalid(problems: list[dict[str, str]], rid: str) -> web.Response:
    return error_response(400, "invalid_request", "The run start request is not a valid RunStartRequest",
                          request_id=rid, details={"errors": problems})


def _too_large(limit: int, rid: str) -> web.Response:
    return error_response(413, "payload_too_large", f"The request body exceeds {limit} bytes",
                          request_id=rid, details={"max_body_bytes": limit})


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    chunks = []
    size = 0
    while True:
        chunk = await stream.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
