"""Gateway configuration: one frozen object built from YAML, environment and flags.

Precedence is flag > environment > YAML > built-in default. Every problem is
collected with the key path it concerns, so a bad file fails at start-up with
one line per problem instead of one surprise at a time.

    cfg = load_config(Path("config/gateway.yaml"), os.environ, {"listen.port": 9000})
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..arp.routes import ALL_ROUTES
from ..util.secretfile import SecretFileError, read_secret

MIB = 1024 * 1024


class AuthMode(StrEnum):
    """`auth.mode`: whether a request needs a bearer token."""

    REQUIRED = "required"   # every non-exempt request needs a valid token
    OPTIONAL = "optional"   # no token: the anonymous principal; a token, if sent, must be valid
    DISABLED = "disabled"   # nothing is verified; every request acts as the dev principal


class ForwardToken(StrEnum):
    """`auth.forward_token`: which token, if any, the coordinator receives."""

    PASSTHROUGH = "passthrough"   # the caller's verified token
    STRIP = "strip"               # none: identity headers only
    EXCHANGE = "exchange"         # one from the STS (RFC 8693 token exchange)


class EventLoop(StrEnum):
    """`listen.event_loop`."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


AUTH_MODES = tuple(m.value for m in AuthMode)
FORWARD_TOKEN_MODES = tuple(m.value for m in ForwardToken)
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
     "HS256", "HS384", "HS512"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = tuple(m.value for m in EventLoop)
PROFILES = ("dev-insecure", "dev-secure-keycloak", "enterprise")
KEYCLOAK_DEV_ISSUER = "http://localhost:8080/realms/arp-dev"
# `arp-gateway dev` and `token` defaults. They live here, not in proxy.dev, so that building the
# command line (for `serve` too) loads no dev code.
DEV_ISSUER_AUDIENCE = "arp-run-gateway"
DEV_ISSUER_PORT = 8089
SECRET_KEYS = frozenset({"client_secret", "hmac_secret"})  # client_secret_file is a path, shown


# Far above any sane setting; beyond it an int no longer converts to float.
_INT_LIMIT = 2**63


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one `key.path: reason` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"             # the public (edge) listener's address; 127.0.0.1 beside the coordinator
    port: int = 8080                    # 0 picks a free port (tests)
    workers: int = 1                    # processes sharing the port (SO_REUSEPORT)
    event_loop: EventLoop = EventLoop.UVLOOP  # uvloop, or asyncio's own loop
    keepalive_timeout_s: float = 75.0   # an idle client keep-alive connection is closed after it
    # Client connections at once; None: derived from the open-file limit, leaving room for the
    # coordinator pool and the control plane. At the cap idle connections are reclaimed first.
    max_connections: int | None = None
    # Peers (CIDR networks) whose X-Forwarded-For/-Proto/-Host are believed: an ingress or load
    # balancer in front of the gateway. Empty: every peer is the client, its X-Forwarded-* replaced.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = 3                   # tries per request, the first included; resets and 5xx retried for GET only
    backoff_initial_s: float = 0.05     # the full-jitter pause cap before the first retry; doubles per retry
    backoff_max_s: float = 1.0          # the largest pause cap between two tries


@dataclass(frozen=True)
class UpstreamConfig:
    url: str | None = None              # the Run Coordinator's base URL (a trailing / or /v1 is dropped)
    connect_timeout_s: float = 2.0      # to open a TCP connection to the coordinator
    request_timeout_s: float = 30.0     # until the coordinator's response headers; then 504
    stream_idle_timeout_s: float = 300.0  # longest silence inside a response body (streams have no total timeout)
    max_connections: int = 100          # pooled keep-alive connections to the coordinator
    health_timeout_s: float = 1.0       # the coordinator's /v1/health probe behind our /v1/health
    keepalive_idle_s: float = 4.0       # an idle pooled connection is closed before the coordinator would
    queue_timeout_s: float = 1.0        # all connections busy: the longest a request waits for one, then 503
    retries: RetryConfig = field(default_factory=RetryConfig)  # retries of failed coordinator requests
    # The most of max_connections event streams may hold at once; the rest stays for short requests.
    stream_share: float = 0.75
    max_response_header_bytes: int = 64 * 1024  # the coordinator's head (and trailer section); larger: 502


@dataclass(frozen=True)
class RateConfig:
    per_second: float                   # tokens added to each subject's bucket per second
    burst: int                          # the bucket's size: run starts allowed at once after a quiet spell


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = MIB           # run start and cancel bodies; larger ones get 413
    header_timeout_s: float = 10.0      # a request head must arrive whole within it, or the connection closes
    body_timeout_s: float = 10.0        # a body must arrive whole within it once wanted, or 408
    max_header_bytes: int = 64 * 1024   # the request target plus header lines; larger heads get 431
    max_headers: int = 100              # header lines per request; more get 431
    # Head and body bytes held in memory by all connections together; while full the gateway reads
    # nothing more, and what stays starved past its header or body timeout gets 503 overloaded.
    max_buffered_bytes: int = 64 * MIB
    send_timeout_s: float = 60.0        # unread answer bytes must drain within it, else the connection is aborted
    run_start_rate: RateConfig | None = None  # None: run starts are not rate limited
    max_streams_per_principal: int = 8  # event streams open at once per principal; more get 429


@dataclass(frozen=True)
class IssuerConfig:
    issuer: str                         # the exact `iss` a token must carry (compared as a string)
    audiences: tuple[str, ...]          # a token's `aud` must name at least one of these
    jwks_uri: str | None = None         # where the signing keys are; None: found by OIDC discovery
    discovery_url: str | None = None    # None: {issuer}/.well-known/openid-configuration
    algorithms: tuple[str, ...] = ("RS256",)  # the JWS algorithms accepted from this issuer
    hmac_secret: str | None = None      # the one HMAC key, needed for HS* algorithms (never from a JWKS)

    @property
    def discovery(self) -> str:
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True)
class AccessRule:
    path: str                           # a forwarded route template, e.g. /v1/runs/{run_id}:cancel
    methods: tuple[str, ...] = ()       # the methods it applies to; empty: all of the route's methods
    scopes: tuple[str, ...] = ()        # scopes the token must all carry
    claims: tuple[tuple[str, str], ...] = ()  # (claim, value) pairs the token must all carry


@dataclass(frozen=True)
class ExchangeConfig:
    token_endpoint: str | None = None   # the STS's OAuth token endpoint (required for forward_token: exchange)
    client_id: str | None = None        # the gateway's client at the STS
    client_secret: str | None = None    # its secret; never logged or printed
    # A file holding the secret (a mounted Kubernetes Secret), read at start-up into client_secret
    # and re-read by the exchanger when it changes (proxy/secretfile.py), so a rotation needs no restart.
    client_secret_file: str | None = None
    audience: str = "arp-run-coordinator"  # the audience asked for: the coordinator
    scope: str | None = None            # scopes asked for, space-separated; None: the STS's default


@dataclass(frozen=True)
class AuthConfig:
    mode: AuthMode = AuthMode.REQUIRED  # required, optional or disabled
    realm: str = "arp-run-gateway"      # the realm in WWW-Authenticate challenges
    issuers: tuple[IssuerConfig, ...] = ()  # trusted token issuers, looked up by a token's `iss`
    clock_skew_s: float = 60.0          # leeway for exp, nbf and iat against our clock
    exempt_paths: tuple[str, ...] = ("/v1/health", "/v1/version")  # raw paths answered without a token
    dev_subject: str = "dev"            # the subject every request acts as with auth disabled
    anonymous_subject: str = "anonymous"  # the subject of tokenless requests in optional mode
    jwks_cache_ttl_s: float = 300.0     # how long fetched keys are fresh when the IdP sends no max-age
    jwks_min_ttl_s: float = 30.0        # an IdP's max-age (or no-store) is raised to at least this
    jwks_max_ttl_s: float = 86400.0     # and lowered to at most this
    jwks_refetch_cooldown_s: float = 30.0  # at most one unknown-kid refetch per issuer in this time
    jwks_max_stale_s: float = 86400.0   # keys older than this (IdP down) are not used: 503 instead
    jwks_fetch_timeout_s: float = 5.0   # one JWKS or discovery request, whole
    token_cache_size: int = 10000       # verified tokens remembered (LRU); 0 verifies every request
    max_token_bytes: int = 8192         # longer bearer tokens are refused before any parsing
    identity_header_prefix: str = "X-Auth-"  # identity headers sent upstream; callers' ones are stripped
    claim_headers: tuple[tuple[str, str], ...] = ()  # (claim, header) pairs also sent upstream
    forward_token: ForwardToken = ForwardToken.PASSTHROUGH  # passthrough, strip or exchange
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)  # the STS, for forward_token: exchange
    rules: tuple[AccessRule, ...] = ()  # per-route scope and claim requirements
    cors_preflight_bypass: bool = False  # forward tokenless CORS preflights (OPTIONS) to the coordinator


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True                # serve Prometheus metrics at all
    host: str = "127.0.0.1"             # the metrics listener's address
    port: int = 9464                    # its port; 0 serves /metrics on the main listener instead


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"                 # debug, info, warning or error
    access_log: bool = True             # one JSON line per request on stdout
    log_subject: bool = False           # put the caller's subject in access log lines (personal data)


@dataclass(frozen=True)
class GatewayConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)        # the public listener
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)  # the Run Coordinator behind it
    limits: LimitsConfig = field(default_factory=LimitsConfig)        # request size and time limits
    auth: AuthConfig = field(default_factory=AuthConfig)              # authentication and authorization
    metrics: MetricsConfig = field(default_factory=MetricsConfig)     # Prometheus metrics
    logging: LoggingConfig = field(default_factory=LoggingConfig)     # log level and access log
    shutdown_grace_s: float = 25.0      # after the listener closes, in-flight requests get this long to finish
    drain_delay_s: float = 5.0          # after SIGTERM, /readyz fails this long before the listener closes


# --------------------------------------------------------------------------- reading


class _Reader:
    """Pulls typed values out of nested mappings, recording problems by key path."""

    def __init__(self, origins: Mapping[str, str]) -> None:
        self.problems: list[str] = []
        self._origins = origins

    def fail(self, path: str, reason: str) -> None:
        origin = self._origins.get(path)
        self.problems.append(f"{path}{f' (from {origin})' if origin else ''}: {reason}")

    def section(self, raw: Any, path: str, known: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path or "<root>", "must be a mapping")
            return {}
        for key in raw:
            if key not in known:
                self.fail(_join(path, _key_name(key)), "unknown key")
        return raw

    def number(self, sec: dict, path: str, key: str, default: float | None, *, minimum: float = 0.0,
               positive: bool = False, integer: bool = False) -> Any:
        full = _join(path, key)
        if key not in sec or sec[key] is None:
            return default
        value = sec[key]
        if isinstance(value, str):
            try:
                value = float(value) if not integer else int(value)
            except ValueError:
                self.fail(full, f"not a{'n integer' if integer else ' number'}: {sec[key]!r}")
                return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(full, f"not a{'n integer' if integer else ' number'}: {value!r}")
            return default
        if isinstance(value, int) and not -_INT_LIMIT <= value <= _INT_LIMIT:
            # float() of such an int raises OverflowError, and its repr may be refused too.
            digits = len(str(abs(value))) if abs(value) < 10**4000 else "over 4000"
            self.fail(full, f"out of range: an integer of {digits} digits")
            return default
        if integer and not float(value).is_integer():
            self.fail(full, f"not an integer: {value!r}")
            return default
        if not math.isfinite(value) or value < minimum or (positive and value <= 0):
            self.fail(full, f"must be {'> 0' if positive else f'>= {minimum:g}'}, got {value!r}")
            return default
        return int(value) if integer else float(value)

    def string(self, sec: dict, path: str, key: str, default: str | None, *,
               choices: tuple[str, ...] | None = None) -> Any:
        full = _join(path, key)
        if key not in sec or sec[key] is None:
            return default
        value = sec[key]
        if not isinstance(value, str) or not value:
            self.fail(full, f"must be a non-empty string, got {value!r}")
            return default
        if choices and value not in choices:
            self.fail(full, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def boolean(self, sec: dict, path: str, key: str, default: bool) -> bool:
        value = sec.get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            self.fail(_join(path, key), f"must be true or false, got {value!r}")
            return default
        return value

    def strings(self, sec: dict, path: str, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = sec.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(_join(path, key), f"must be a list of non-empty strings, got {value!r}")
            return default
        return tuple(value)

    def url(self, sec: dict, path: str, key: str, default: str | None = None) -> str | None:
        value = self.string(sec, path, key, default)
        if value is not None and value is not default and not _is_http_url(value):
            self.fail(_join(path, key), f"not an http(s) URL: {value!r}")
            return default
        return value


def _key_name(key: Any) -> str:
    """An unknown key as the operator can find it: quoted when it is empty, padded or would read as
    a path (an empty key would otherwise print as `: unknown key`)."""
    name = str(key)
    if not name or name != name.strip() or any(c in name for c in ".:[]#\n"):
        return repr(name)
    return name


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _is_plain_http_off_host(url: str) -> bool:
    """An http:// URL whose host is not loopback: what is fetched from it can be forged on the way."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme != "http" or not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _known(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def normalize_coordinator_url(url: str) -> str:
    """JARVIS accepts `http://host:port/`, `.../v1` and `.../v1/` for the same coordinator."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


# --------------------------------------------------------------------------- sections


def _listen(r: _Reader, raw: Any) -> ListenConfig:
    sec = r.section(raw, "listen", _known(ListenConfig))
    d = ListenConfig()
    return ListenConfig(
        host=r.string(sec, "listen", "host", d.host),
        port=r.number(sec, "listen", "port", d.port, integer=True, minimum=0),
        workers=r.number(sec, "listen", "workers", d.workers, integer=True, minimum=1),
        event_loop=EventLoop(r.string(sec, "listen", "event_loop", d.event_loop, choices=EVENT_LOOPS)),
        keepalive_timeout_s=r.number(sec, "listen", "keepalive_timeout_s", d.keepalive_timeout_s, positive=True),
        max_connections=r.number(sec, "listen", "max_connections", None, integer=True, minimum=1),
        trusted_proxies=_networks(r, sec, "listen", "trusted_proxies"),
    )


def _networks(r: _Reader, sec: dict, path: str, key: str) -> tuple[str, ...]:
    """CIDR networks in their normal form; a bare address is its own /32 or /128."""
    networks = []
    for n, value in enumerate(r.strings(sec, path, key, ())):
        try:
            networks.append(str(ipaddress.ip_network(value.strip())))
        except ValueError as exc:
            r.fail(f"{_join(path, key)}[{n}]", f"not a CIDR network: {value!r} ({exc})")
    return tuple(networks)


def _upstream(r: _Reader, raw: Any) -> UpstreamConfig:
    p = "upstream"
    sec = r.section(raw, p, _known(UpstreamConfig))
    d = UpstreamConfig()
    rsec = r.section(sec.get("retries"), "upstream.retries", _known(RetryConfig))
    rd = RetryConfig()
    url = r.url(sec, p, "url")
    return UpstreamConfig(
        url=normalize_coordinator_url(url) if url else None,
        connect_timeout_s=r.number(sec, p, "connect_timeout_s", d.connect_timeout_s, positive=True),
        request_timeout_s=r.number(sec, p, "request_timeout_s", d.request_timeout_s, positive=True),
        stream_idle_timeout_s=r.number(sec, p, "stream_idle_timeout_s", d.stream_idle_timeout_s, positive=True),
        max_connections=r.number(sec, p, "max_connections", d.max_connections, integer=True, minimum=1),
        health_timeout_s=r.number(sec, p, "health_timeout_s", d.health_timeout_s, positive=True),
        keepalive_idle_s=r.number(sec, p, "keepalive_idle_s", d.keepalive_idle_s, positive=True),
        queue_timeout_s=r.number(sec, p, "queue_timeout_s", d.queue_timeout_s, positive=True),
        retries=RetryConfig(
            attempts=r.number(rsec, "upstream.retries", "attempts", rd.attempts, integer=True, minimum=1),
            backoff_initial_s=r.number(rsec, "upstream.retries", "backoff_initial_s", rd.backoff_initial_s),
            backoff_max_s=r.number(rsec, "upstream.retries", "backoff_max_s", rd.backoff_max_s),
        ),
        stream_share=_share(r, sec, p, "stream_share", d.stream_share),
        max_response_header_bytes=r.number(sec, p, "max_response_header_bytes", d.max_response_header_bytes,
                                           integer=True, minimum=1024),
    )


def _share(r: _Reader, sec: dict, path: str, key: str, default: float) -> float:
    value = r.number(sec, path, key, default, positive=True)
    if value > 1:
        r.fail(_join(path, key), f"must be a fraction in (0, 1], got {value!r}")
        return default
    return float(value)


def _limits(r: _Reader, raw: Any) -> LimitsConfig:
    p = "limits"
    sec = r.section(raw, p, _known(LimitsConfig))
    d = LimitsConfig()
    return LimitsConfig(
        max_body_bytes=r.number(sec, p, "max_body_bytes", d.max_body_bytes, integer=True, positive=True),
        header_timeout_s=r.number(sec, p, "header_timeout_s", d.header_timeout_s, positive=True),
        body_timeout_s=r.number(sec, p, "body_timeout_s", d.body_timeout_s, positive=True),
        max_header_bytes=r.number(sec, p, "max_header_bytes", d.max_header_bytes, integer=True, minimum=1024),
        max_headers=r.number(sec, p, "max_headers", d.max_headers, integer=True, minimum=8),
        max_buffered_bytes=r.number(sec, p, "max_buffered_bytes", d.max_buffered_bytes, integer=True,
                                    positive=True),
        send_timeout_s=r.number(sec, p, "send_timeout_s", d.send_timeout_s, positive=True),
        run_start_rate=_rate(r, sec.get("run_start_rate"), "limits.run_start_rate"),
        max_streams_per_principal=r.number(sec, p, "max_streams_per_principal", d.max_streams_per_principal,
                                           integer=True, minimum=1),
    )


def _rate(r: _Reader, raw: Any, path: str) -> RateConfig | None:
    if raw is None:
        return None
    sec = r.section(raw, path, _known(RateConfig))
    if not isinstance(raw, dict):
        return None
    for key in ("per_second", "burst"):
        if sec.get(key) is None:
            r.fail(_join(path, key), f"required when {path} is set")
    per_second = r.number(sec, path, "per_second", 0.0, positive=True)
    burst = r.number(sec, path, "burst", 0, integer=True, minimum=1)
    return RateConfig(per_second=per_second, burst=burst) if per_second > 0 and burst >= 1 else None


def _issuer(r: _Reader, raw: Any, path: str) -> IssuerConfig | None:
    sec = r.section(raw, path, _known(IssuerConfig))
    issuer = r.string(sec, path, "issuer", None)
    if issuer is None:
        r.fail(_join(path, "issuer"), "required")
    elif not _is_http_url(issuer):
        # Keys are found at {issuer}/.well-known/openid-configuration: without a scheme the gateway
        # would start and then never load a key (/readyz stuck on jwks_not_loaded).
        r.fail(_join(path, "issuer"), f"must be an http(s) URL, exactly the tokens' `iss` "
                                      f"(e.g. https://idp.example.com/realms/arp); got {issuer!r}")
        issuer = None
    audiences = r.strings(sec, path, "audiences", ())
    if not audiences:
        r.fail(_join(path, "audiences"), "at least one audience is required")
    algorithms = r.strings(sec, path, "algorithms", ("RS256",))
    for alg in algorithms:
        if alg not in SUPPORTED_ALGORITHMS:
            r.fail(_join(path, "algorithms"), f"unsupported algorithm {alg!r}")
    hmac_secret = r.string(sec, path, "hmac_secret", None)
    if any(a in HMAC_ALGORITHMS for a in algorithms) and not hmac_secret:
        r.fail(_join(path, "algorithms"), "HMAC algorithms need an explicit hmac_secret")
    if hmac_secret and len(hmac_secret.encode()) < 32:
        r.fail(_join(path, "hmac_secret"), "must be at least 32 bytes")
    if issuer is None or not audiences:
        return None
    return IssuerConfig(
        issuer=issuer,
        audiences=audiences,
        jwks_uri=r.url(sec, path, "jwks_uri"),
        discovery_url=r.url(sec, path, "discovery_url"),
        algorithms=algorithms,
        hmac_secret=hmac_secret,
    )


def _rule(r: _Reader, raw: Any, path: str) -> AccessRule | None:
    sec = r.section(raw, path, _known(AccessRule))
    route = r.string(sec, path, "path", None)
    if route is None:
        r.fail(_join(path, "path"), "required")
        return None
    templates = sorted(t.template for t in ALL_ROUTES if t.forward)
    if route not in templates:
        r.fail(_join(path, "path"), f"not a forwarded route template; one of {', '.join(templates)}")
    claims = sec.get("claims") or {}
    if not isinstance(claims, dict) or not all(isinstance(v, (str, int, bool)) for v in claims.values()):
        r.fail(_join(path, "claims"), "must map claim names to single values")
        claims = {}
    return AccessRule(
        path=route,
        methods=tuple(m.upper() for m in r.strings(sec, path, "methods", ())),
        scopes=r.strings(sec, path, "scopes", ()),
        claims=tuple((str(k), str(v)) for k, v in claims.items()),
    )


def _auth(r: _Reader, raw: Any) -> AuthConfig:
    p = "auth"
    sec = r.section(raw, p, _known(AuthConfig))
    d = AuthConfig()
    issuers_raw = sec.get("issuers") or []
    if not isinstance(issuers_raw, list):
        r.fail("auth.issuers", "must be a list")
        issuers_raw = []
    issuers = tuple(i for n, raw_i in enumerate(issuers_raw) if (i := _issuer(r, raw_i, f"auth.issuers[{n}]")))
    rules_raw = sec.get("rules") or []
    if not isinstance(rules_raw, list):
        r.fail("auth.rules", "must be a list")
        rules_raw = []
    rules = tuple(x for n, raw_x in enumerate(rules_raw) if (x := _rule(r, raw_x, f"auth.rules[{n}]")))
    xsec = r.section(sec.get("exchange"), "auth.exchange", _known(ExchangeConfig))
    xd = ExchangeConfig()
    exchange = ExchangeConfig(
        token_endpoint=r.url(xsec, "auth.exchange", "token_endpoint"),
        client_id=r.string(xsec, "auth.exchange", "client_id", None),
        client_secret=_client_secret(r, xsec),
        client_secret_file=r.string(xsec, "auth.exchange", "client_secret_file", None),
        audience=r.string(xsec, "auth.exchange", "audience", xd.audience),
        scope=r.string(xsec, "auth.exchange", "scope", None),
    )
    claim_headers = sec.get("claim_headers") or {}
    if not isinstance(claim_headers, dict) or not all(isinstance(v, str) for v in claim_headers.values()):
        r.fail("auth.claim_headers", "must map claim names to header names")
        claim_headers = {}
    cfg = AuthConfig(
        mode=AuthMode(r.string(sec, p, "mode", d.mode, choices=AUTH_MODES)),
        realm=r.string(sec, p, "realm", d.realm),
        issuers=issuers,
        clock_skew_s=r.number(sec, p, "clock_skew_s", d.clock_skew_s),
        exempt_paths=r.strings(sec, p, "exempt_paths", d.exempt_paths),
        dev_subject=r.string(sec, p, "dev_subject", d.dev_subject),
        anonymous_subject=r.string(sec, p, "anonymous_subject", d.anonymous_subject),
        jwks_cache_ttl_s=r.number(sec, p, "jwks_cache_ttl_s", d.jwks_cache_ttl_s, positive=True),
        jwks_min_ttl_s=r.number(sec, p, "jwks_min_ttl_s", d.jwks_min_ttl_s, positive=True),
        jwks_max_ttl_s=r.number(sec, p, "jwks_max_ttl_s", d.jwks_max_ttl_s, positive=True),
        jwks_refetch_cooldown_s=r.number(sec, p, "jwks_refetch_cooldown_s", d.jwks_refetch_cooldown_s),
        jwks_max_stale_s=r.number(sec, p, "jwks_max_stale_s", d.jwks_max_stale_s, positive=True),
        jwks_fetch_timeout_s=r.number(sec, p, "jwks_fetch_timeout_s", d.jwks_fetch_timeout_s, positive=True),
        token_cache_size=r.number(sec, p, "token_cache_size", d.token_cache_size, integer=True),
        max_token_bytes=r.number(sec, p, "max_token_bytes", d.max_token_bytes, integer=True, positive=True),
        identity_header_prefix=r.string(sec, p, "identity_header_prefix", d.identity_header_prefix),
        claim_headers=tuple((str(k), v) for k, v in claim_headers.items()),
        forward_token=ForwardToken(r.string(sec, p, "forward_token", d.forward_token,
                                               choices=FORWARD_TOKEN_MODES)),
        exchange=exchange,
        rules=rules,
        cors_preflight_bypass=r.boolean(sec, p, "cors_preflight_bypass", d.cors_preflight_bypass),
    )
    _check_auth(r, cfg, listed=bool(issuers_raw))
    return cfg


def _client_secret(r: _Reader, xsec: dict) -> str | None:
    """auth.exchange.client_secret, or the content of auth.exchange.client_secret_file."""
    secret = r.string(xsec, "auth.exchange", "client_secret", None)
    path = r.string(xsec, "auth.exchange", "client_secret_file", None)
    if path is None:
        return secret
    key = "auth.exchange.client_secret_file"
    if secret is not None:
        r.fail(key, "set either auth.exchange.client_secret or auth.exchange.client_secret_file, not both")
        return secret
    try:
        return read_secret(path)
    except SecretFileError as exc:
        r.fail(key, exc.reason)
        return None


def _check_auth(r: _Reader, cfg: AuthConfig, *, listed: bool) -> None:
    # An issuer that is listed but invalid has its own line already.
    if cfg.mode != AuthMode.DISABLED and not cfg.issuers and not listed:
        r.fail("auth.issuers", f"auth.mode is {cfg.mode.value!r} but no issuer is configured "
                               "(set auth.issuers or ARP_AUTH_ISSUER, or auth.mode: disabled)")
    if cfg.jwks_min_ttl_s > cfg.jwks_max_ttl_s:
        r.fail("auth.jwks_min_ttl_s", "must not exceed auth.jwks_max_ttl_s")
    if not cfg.identity_header_prefix.lower().startswith("x-"):
        r.fail("auth.identity_header_prefix", "must start with 'X-'")
    if cfg.forward_token == ForwardToken.EXCHANGE:
        x = cfg.exchange
        for key in ("token_endpoint", "client_id", "client_secret"):
            if not getattr(x, key) and not (key == "client_secret" and x.client_secret_file):
                also = " (or auth.exchange.client_secret_file)" if key == "client_secret" else ""
                r.fail(f"auth.exchange.{key}", f"required{also} when auth.forward_token is 'exchange'")


def _metrics(r: _Reader, raw: Any) -> MetricsConfig:
    sec = r.section(raw, "metrics", _known(MetricsConfig))
    d = MetricsConfig()
    return MetricsConfig(
        enabled=r.boolean(sec, "metrics", "enabled", d.enabled),
        host=r.string(sec, "metrics", "host", d.host),
        port=r.number(sec, "metrics", "port", d.port, integer=True),
    )


def _logging(r: _Reader, raw: Any) -> LoggingConfig:
    sec = r.section(raw, "logging", _known(LoggingConfig))
    d = LoggingConfig()
    level = sec.get("level")
    if isinstance(level, str):
        sec = {**sec, "level": level.lower()}
    return LoggingConfig(
        level=r.string(sec, "logging", "level", d.level, choices=LOG_LEVELS),
        access_log=r.boolean(sec, "logging", "access_log", d.access_log),
        log_subject=r.boolean(sec, "logging", "log_subject", d.log_subject),
    )


def build_config(raw: Any, origins: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validates a raw mapping (YAML with overrides applied) into a GatewayConfig."""
    r = _Reader(origins or {})
    top = r.section(raw, "", _known(GatewayConfig))
    d = GatewayConfig()
    cfg = GatewayConfig(
        listen=_listen(r, top.get("listen")),
        upstream=_upstream(r, top.get("upstream")),
        limits=_limits(r, top.get("limits")),
        auth=_auth(r, top.get("auth")),
        metrics=_metrics(r, top.get("metrics")),
        logging=_logging(r, top.get("logging")),
        shutdown_grace_s=r.number(top, "", "shutdown_grace_s", d.shutdown_grace_s),
        drain_delay_s=r.number(top, "", "drain_delay_s", d.drain_delay_s),
    )
    if cfg.limits.max_header_bytes <= cfg.auth.max_token_bytes + 256:
        r.fail("limits.max_header_bytes", f"must leave room for a token of auth.max_token_bytes "
                                          f"({cfg.auth.max_token_bytes}) plus other headers, so an oversized "
                                          "token gets its 401")
    lim = cfg.limits
    if lim.max_buffered_bytes < lim.max_body_bytes + lim.max_header_bytes:
        r.fail("limits.max_buffered_bytes", f"must hold at least one whole request: limits.max_body_bytes plus "
                                            f"limits.max_header_bytes ({lim.max_body_bytes + lim.max_header_bytes})")
    if cfg.listen.workers > 1 and cfg.listen.port == 0:
        r.fail("listen.workers", "several workers need a fixed listen.port to share")
    if r.problems:
        raise ConfigError(r.problems)
    return cfg


def config_warnings(cfg: GatewayConfig) -> list[str]:
    """Valid but risky settings, one `key.path: reason` each; the CLI prints or logs them."""
    warnings: list[str] = []
    if cfg.auth.mode != AuthMode.REQUIRED:
        return warnings
    for n, issuer in enumerate(cfg.auth.issuers):
        for key in ("issuer", "discovery_url", "jwks_uri"):
            url = getattr(issuer, key)
            if url and _is_plain_http_off_host(url):
                warnings.append(f"auth.issuers[{n}].{key}: {url} is plain http:// off this host; signing keys "
                                "fetched over it can be forged in transit (use https://)")
    return warnings


# --------------------------------------------------------------------------- overrides


def _set(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


def _first_issuer(raw: dict) -> dict:
    auth = raw.setdefault("auth", {}) if isinstance(raw.get("auth", {}), dict) else {}
    issuers = auth.get("issuers")
    if not isinstance(issuers, list) or not issuers or not isinstance(issuers[0], dict):
        issuers = [{}]
        auth["issuers"] = issuers
    return issuers[0]


def apply_environment(raw: dict, env: Mapping[str, str], origins: dict[str, str]) -> None:
    """Overlays the JARVIS / ARP_AUTH_* variables onto the raw YAML mapping, in place."""

    def put(path: str, name: str, value: Any) -> None:
        _set(raw, path, value)
        origins[path] = name

    if v := env.get("JARVIS_RUN_COORDINATOR_URL"):
        put("upstream.url", "JARVIS_RUN_COORDINATOR_URL", v)
    if v := env.get("JARVIS_RUN_COORDINATOR_AUDIENCE"):
        put("auth.exchange.audience", "JARVIS_RUN_COORDINATOR_AUDIENCE", v)
    if v := env.get("LOG_LEVEL"):
        put("logging.level", "LOG_LEVEL", v)

    profile = env.get("ARP_AUTH_PROFILE", "").strip().lower()
    if profile:
        if profile not in PROFILES:
            put("auth.mode", "ARP_AUTH_PROFILE", f"<unknown profile {profile!r}>")
        elif profile == "dev-insecure":
            put("auth.mode", "ARP_AUTH_PROFILE", "disabled")
        else:
            put("auth.mode", "ARP_AUTH_PROFILE", "required")
            if profile == "dev-secure-keycloak" and not env.get("ARP_AUTH_ISSUER"):
                _first_issuer(raw)["issuer"] = KEYCLOAK_DEV_ISSUER
                origins["auth.issuers[0].issuer"] = "ARP_AUTH_PROFILE"
    if v := env.get("ARP_AUTH_MODE"):
        put("auth.mode", "ARP_AUTH_MODE", v.strip().lower())

    issuer_vars = {
        "ARP_AUTH_ISSUER": "issuer",
        "ARP_AUTH_JWKS_URI": "jwks_uri",
        "ARP_AUTH_OIDC_DISCOVERY_URL": "discovery_url",
        "ARP_AUTH_ALGORITHMS": "algorithms",
    }
    audience = env.get("ARP_AUTH_AUDIENCE") or env.get("ARP_AUTH_SERVICE_ID")
    if audience or any(env.get(name) for name in issuer_vars):
        first = _first_issuer(raw)
        for name, key in issuer_vars.items():
            if v := env.get(name):
                first[key] = v
                origins[f"auth.issuers[0].{key}"] = name
        if audience:
            first["audiences"] = audience
            origins["auth.issuers[0].audiences"] = (
                "ARP_AUTH_AUDIENCE" if env.get("ARP_AUTH_AUDIENCE") else "ARP_AUTH_SERVICE_ID")

    plain = {
        "ARP_AUTH_CLOCK_SKEW_SECONDS": "auth.clock_skew_s",
        "ARP_AUTH_EXEMPT_PATHS": "auth.exempt_paths",
        "ARP_AUTH_DEV_SUBJECT": "auth.dev_subject",
        "ARP_AUTH_ANONYMOUS_SUBJECT": "auth.anonymous_subject",
        "ARP_AUTH_CLIENT_ID": "auth.exchange.client_id",
        "ARP_AUTH_CLIENT_SECRET": "auth.exchange.client_secret",
        "ARP_AUTH_CLIENT_SECRET_FILE": "auth.exchange.client_secret_file",
        "ARP_AUTH_TOKEN_ENDPOINT": "auth.exchange.token_endpoint",
    }
    exchange = raw.get("auth", {}).get("exchange") if isinstance(raw.get("auth"), dict) else None
    if isinstance(exchange, dict):
        # The environment outranks the YAML: a secret from it replaces the YAML's, in either form.
        if env.get("ARP_AUTH_CLIENT_SECRET"):
            exchange.pop("client_secret_file", None)
        if env.get("ARP_AUTH_CLIENT_SECRET_FILE"):
            exchange.pop("client_secret", None)
    for name, path in plain.items():
        if v := env.get(name):
            put(path, name, v)
    # JARVIS derives the Keycloak token endpoint from the issuer when none is given.
    if env.get("ARP_AUTH_CLIENT_ID") and not env.get("ARP_AUTH_TOKEN_ENDPOINT") and env.get("ARP_AUTH_ISSUER"):
        put("auth.exchange.token_endpoint", "ARP_AUTH_ISSUER",
            env["ARP_AUTH_ISSUER"].rstrip("/") + "/protocol/openid-connect/token")


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"--config: cannot read {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"--config: {path} is not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # PyYAML lets int() refuse a number of over 4300 digits (ValueError) and deep nesting
        # overflow the stack; both are a bad file, not a crash.
        reason = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise ConfigError([f"--config: {path} is not valid YAML: {reason}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: {path} must hold a mapping, not {type(raw).__name__}"])
    return raw


def load_config(path: Path | None, env: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> GatewayConfig:
    """YAML (optional) < environment < command-line flags, validated as a whole."""
    raw = read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}
    apply_environment(raw, env, origins)
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set(raw, dotted, value)
            origins[dotted] = "--" + dotted.split(".")[-1]
    return build_config(raw, origins)


def redacted(cfg: GatewayConfig) -> dict:
    """The resolved configuration as plain data, secrets replaced, for check-config and logs."""

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ("***" if k in SECRET_KEYS and v else scrub(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [scrub(v) for v in value]
        if isinstance(value, Enum):
            return value.value  # plain data: YAML and JSON writers know no enums
        return value

    return scrub(dataclasses.asdict(cfg))
