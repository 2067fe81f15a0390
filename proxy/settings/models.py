"""The gateway configuration, declared once: each key with its type, default, constraint and meaning.

The models are pydantic dataclasses: they validate YAML-shaped input (build_config), stay plain
frozen dataclasses for the code that reads them (attribute reads on the hot path, dataclasses.fields
and replace in tests), and are the source of the JSON Schema and the reference in docs/ (reference.py).
A problem is raised as `problem(...)`: a reason in the operator's words, optionally for another key
of the same model, which problems.py turns into `key.path: reason` lines.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, WithJsonSchema, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from ..arp.policy import PolicyFileError, load_policy
from ..arp.routes import ALL_ROUTES
from ..util.certificates import CertificateProblem, TlsFiles, build_context
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


class ClientAuth(StrEnum):
    """`listen.tls.client_auth`: whether a client certificate is asked for at the handshake."""

    NONE = "none"           # not asked for
    OPTIONAL = "optional"   # asked for; one that is sent must verify against client_ca_file
    REQUIRED = "required"   # a handshake without a valid one fails


class RunAccess(StrEnum):
    """`runs.access`: who may get, cancel and stream a run."""

    ANY = "any"         # every authenticated caller (no per-run check)
    OWNER = "owner"     # the caller whose iss and sub the run's run_context.identity holds
    TENANT = "tenant"   # callers whose tenant claim equals the run's run_context.tenant_id


class OnConflict(StrEnum):
    """`runs.on_conflict`: a client-sent identity, actor or tenant_id unlike the gateway's."""

    REFUSE = "refuse"
    OVERWRITE = "overwrite"


class EventLoop(StrEnum):
    """`listen.event_loop`."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class AuditSink(StrEnum):
    """`audit.sink`: where audit records go."""

    OFF = "off"         # no audit trail at all
    STDOUT = "stdout"   # the process's stdout, beside the access log
    FILE = "file"       # audit.path, appended to; reopened when rotated


class AuditOnFull(StrEnum):
    """`audit.on_full`: what happens when records cannot be kept."""

    DROP = "drop"       # count and lose them; requests go on
    REFUSE = "refuse"   # refuse run starts and cancels (503 audit_unavailable) until records are written again


AUTH_MODES = tuple(m.value for m in AuthMode)
FORWARD_TOKEN_MODES = tuple(m.value for m in ForwardToken)
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
     "HS256", "HS384", "HS512"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = tuple(m.value for m in EventLoop)
SECRET_KEYS = frozenset({"client_secret", "hmac_secret"})  # client_secret_file is a path, shown

# Far above any sane setting; beyond it an int no longer converts to float.
_INT_LIMIT = 2**63


# --------------------------------------------------------------------------- problems


def problem(reason: str, at: str = "") -> PydanticCustomError:
    """A configuration problem; `at` names another key of the model being validated."""
    return PydanticCustomError("config", "{reason}", {"reason": reason, "at": at})


def problems(found: list[tuple[str, str]]) -> PydanticCustomError:
    """Several problems of one model at once (a model validator can raise only one error)."""
    return PydanticCustomError("config", "{reason}", {"reason": "; ".join(r for _, r in found), "problems": found})


def shown(value: Any) -> str:
    """A hostile value as a message may quote it: short, and never a str() that Python refuses."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else "over 4000"
        return f"an integer of {digits} digits"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- value types


def _real(value: Any) -> Any:
    if isinstance(value, bool):
        raise problem(f"not a number: {shown(value)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise problem(f"not a number: {shown(value)}") from None
    if isinstance(value, int) and not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise problem(f"out of range: {shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise problem(f"must be a finite number, got {shown(value)}")
    return value


def _whole(value: Any) -> Any:
    if isinstance(value, bool):
        raise problem(f"not an integer: {shown(value)}")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise problem(f"not an integer: {shown(value)}") from None
    if isinstance(value, int) and not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise problem(f"out of range: {shown(value)}")
    if isinstance(value, float) and not value.is_integer():
        raise problem(f"not an integer: {shown(value)}")
    return value


def _comma_list(value: Any) -> Any:
    """The environment gives lists as `a, b`; YAML may too."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _http_url(value: str) -> str:
    if not _is_http_url(value):
        raise problem(f"not an http(s) URL: {shown(value)}")
    return value


def normalize_coordinator_url(url: str) -> str:
    """JARVIS accepts `http://host:port/`, `.../v1` and `.../v1/` for the same coordinator."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _issuer_url(value: str) -> str:
    # Keys are found at {issuer}/.well-known/openid-configuration: without a scheme the gateway
    # would start and then never load a key (/readyz stuck on jwks_not_loaded).
    if not _is_http_url(value):
        raise problem(f"must be an http(s) URL, exactly the tokens' `iss` "
                      f"(e.g. https://idp.example.com/realms/arp); got {shown(value)}")
    return value


def _cidr(value: str) -> str:
    """A network in its normal form; a bare address is its own /32 or /128."""
    try:
        return str(ipaddress.ip_network(value.strip()))
    except ValueError as exc:
        raise problem(f"not a CIDR network: {shown(value)} ({exc})") from None


def _algorithm(value: str) -> str:
    if value not in SUPPORTED_ALGORITHMS:
        raise problem(f"unsupported algorithm {shown(value)}")
    return value


def _forwarded_route(value: str) -> str:
    templates = sorted(t.template for t in ALL_ROUTES if t.forward)
    if value not in templates:
        raise problem(f"not a forwarded route template; one of {', '.join(templates)}")
    return value


def _fraction(value: float) -> float:
    if value > 1:
        raise problem(f"must be a fraction in (0, 1], got {shown(value)}")
    return value


def _header_prefix(value: str) -> str:
    if not value.lower().startswith("x-"):
        raise problem("must start with 'X-'")
    return value


def _pairs(what: str, single: tuple[type, ...]) -> Any:
    """A YAML mapping of names to single values, kept as (name, value) pairs."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            if not all(isinstance(v, single) for v in value.values()):
                raise problem(f"must map {what}")
            return tuple((str(k), str(v)) for k, v in value.items())
        if isinstance(value, (tuple, list)):   # already pairs: built in code
            return value
        raise problem(f"must map {what}")

    return convert


def _not_empty(what: str) -> Any:
    def check(value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise problem(what)
        return value

    return check


Number = Annotated[float, BeforeValidator(_real)]
Count = Annotated[int, BeforeValidator(_whole)]
Text = Annotated[str, Strict(), Field(min_length=1)]
Url = Annotated[Text, AfterValidator(_http_url)]
Texts = Annotated[tuple[Text, ...], BeforeValidator(_comma_list)]
Claims = Annotated[
    tuple[tuple[str, str], ...], BeforeValidator(_pairs("claim names to single values", (str, int, bool))),
    WithJsonSchema({"type": "object", "additionalProperties": {"type": ["string", "integer", "boolean"]}})]
ClaimHeaders = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_pairs("claim names to header names", (str,))),
                         WithJsonSchema({"type": "object", "additionalProperties": {"type": "string"}})]


# --------------------------------------------------------------------------- models


# Unknown keys are errors (a typo must not silently fall back to a default).
_STRICT_KEYS = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT_KEYS)
class _Model:
    """What every section shares: a key set to null means its default, as if it were absent."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # Only known keys: `colour: null` is still an unknown key.
            return {k: v for k, v in data.items() if v is not None or k not in cls.__dataclass_fields__}
        return data


def _tls_version(value: Any) -> Any:
    # YAML reads an unquoted 1.2 as a number.
    return str(value) if isinstance(value, float) else value


TlsVersion = Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)]


def _checked_files(files: TlsFiles, *, server: bool, min_version: str, client_auth: str = "none") -> None:
    """The files load as the gateway will load them (parse, key matches, not expired): a problem
    fails start-up naming the key instead of failing the first handshake."""
    try:
        build_context(files, server=server, min_version=min_version, client_auth=client_auth)
    except CertificateProblem as exc:
        at = {"ca_file": "client_ca_file"}.get(exc.key, exc.key) if server else exc.key
        raise problem(exc.reason, at=at) from None


@dataclass(frozen=True, config=_STRICT_KEYS)
class ListenTlsConfig(_Model):
    """HTTPS on the public listener; off unless cert_file and key_file are set."""

    cert_file: Text | None = Field(default=None, description="the server certificate chain (PEM), leaf first; "
                                                             "re-read when it changes")
    key_file: Text | None = Field(default=None, description="its private key (PEM, unencrypted)")
    min_version: TlsVersion = Field(default="1.2", description="the lowest TLS version accepted: 1.2 or 1.3")
    reload_interval_s: Number = Field(default=10.0, gt=0, description=(
        "how often the files are checked for a change (also on SIGHUP); a changed pair that loads is used "
        "for new handshakes, a bad one is refused and the old one kept"))
    client_ca_file: Text | None = Field(default=None, description="CA certificates (PEM) that client certificates "
                                                                  "must chain to")
    client_auth: ClientAuth = Field(default=ClientAuth.NONE, description=(
        "none, optional (a client certificate is asked for, verified if sent) or required (the handshake "
        "fails without a valid one); needs client_ca_file"))
    session_tickets: int = Field(default=2, ge=0, le=8, description=(
        "TLS 1.3 session tickets sent after each full handshake, with which a client resumes a later "
        "connection without one (OpenSSL's default, 2, lets it open two at once); each costs the server work "
        "on every full handshake, so 0 suits clients that never resume (many HTTP client libraries keep no "
        "TLS session between connections): every connection then makes a full handshake. TLS 1.2 resumption "
        "is unaffected"))

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def files(self) -> TlsFiles:
        return TlsFiles(self.cert_file, self.key_file, self.client_ca_file)

    @model_validator(mode="after")
    def _usable(self) -> ListenTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise problem("set listen.tls.cert_file and listen.tls.key_file together",
                          at="key_file" if self.key_file is None else "cert_file")
        if self.client_auth != ClientAuth.NONE and self.client_ca_file is None:
            raise problem(f"client_auth {self.client_auth.value!r} needs listen.tls.client_ca_file",
                          at="client_ca_file")
        if self.cert_file is None:
            if self.client_ca_file is not None or self.client_auth != ClientAuth.NONE:
                raise problem("client certificates need TLS: set listen.tls.cert_file and key_file",
                              at="cert_file")
            return self
        _checked_files(self.files, server=True, min_version=self.min_version, client_auth=self.client_auth.value)
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class UpstreamTlsConfig(_Model):
    """TLS to an https:// coordinator: a private CA, a client certificate, the name to verify."""

    ca_file: Text | None = Field(default=None, description="CA certificates (PEM) the coordinator's certificate "
                                                           "must chain to, instead of the system trust store")
    cert_file: Text | None = Field(default=None, description="a client certificate chain (PEM) presented to the "
                                                             "coordinator")
    key_file: Text | None = Field(default=None, description="its private key (PEM, unencrypted)")
    server_name: Text | None = Field(default=None, description="the name sent (SNI) and verified in the "
                                                               "coordinator's certificate; unset: the URL's host")
    reload_interval_s: Number = Field(default=10.0, gt=0, description="how often the files are checked for a "
                                                                      "change (also on SIGHUP)")

    @property
    def files(self) -> TlsFiles:
        return TlsFiles(self.cert_file, self.key_file, self.ca_file)

    @property
    def configured(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.server_name)

    @model_validator(mode="after")
    def _usable(self) -> UpstreamTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise problem("set upstream.tls.cert_file and upstream.tls.key_file together",
                          at="key_file" if self.key_file is None else "cert_file")
        if self.ca_file or self.cert_file:
            _checked_files(self.files, server=False, min_version="1.2")
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class ListenConfig(_Model):
    """The public (edge) listener."""

    host: Text = Field(default="127.0.0.1", description="the public listener's address; 127.0.0.1 beside the "
                                                        "coordinator, 0.0.0.0 in a Kubernetes pod (flag --host)")
    port: Count = Field(default=8080, ge=0, le=65535, description="its port; 0 picks a free port (flag --port)")
    workers: Count = Field(default=1, ge=1, description="processes sharing the port (SO_REUSEPORT), each with its "
                                                        "own caches")
    event_loop: EventLoop = Field(default=EventLoop.UVLOOP, description="uvloop, or asyncio's own loop")
    keepalive_timeout_s: Number = Field(default=75.0, gt=0, description="an idle client keep-alive connection is "
                                                                        "closed after it")
    max_connections: Annotated[int, Field(ge=1), BeforeValidator(_whole)] | None = Field(default=None, description=(
        "client connections at once; unset: derived from the open-file limit, leaving room for the "
        "coordinator pool and the control plane. At the cap idle connections are reclaimed first"))
    trusted_proxies: Annotated[tuple[Annotated[Text, AfterValidator(_cidr)], ...], BeforeValidator(_comma_list)] = (
        Field(default=(), description="peers (CIDR networks; a bare address is a /32 or /128) whose X-Forwarded-For, "
                                      "-Proto and -Host are believed: the ingress in front of the gateway. Empty: "
                                      "every peer is the client, its X-Forwarded-* replaced"))
    tls: ListenTlsConfig = Field(default_factory=ListenTlsConfig, description="HTTPS on this listener (docs/tls.md)")

    @model_validator(mode="after")
    def _workers_share_a_port(self) -> ListenConfig:
        if self.workers > 1 and self.port == 0:
            raise problem("several workers need a fixed listen.port to share", at="workers")
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class RetryConfig(_Model):
    """Retries of failed coordinator requests: connection failures for every method (the request
    never left), 502/503/504 and resets for GET only; a run is never started twice by a retry."""

    attempts: Count = Field(default=3, ge=1, description="tries per request, the first included")
    backoff_initial_s: Number = Field(default=0.05, ge=0, description="the full-jitter pause cap before the first "
                                                                      "retry; doubles per retry")
    backoff_max_s: Number = Field(default=1.0, ge=0, description="the largest pause cap between two tries")


@dataclass(frozen=True, config=_STRICT_KEYS)
class UpstreamConfig(_Model):
    """The Run Coordinator behind the gateway."""

    url: Annotated[Url, AfterValidator(normalize_coordinator_url)] | None = Field(default=None, description=(
        "the Run Coordinator's base URL (a trailing / or /v1 is dropped); unset: run calls answer "
        "503 run_coordinator_missing"))
    connect_timeout_s: Number = Field(default=2.0, gt=0, description="to open a TCP connection to the coordinator")
    request_timeout_s: Number = Field(default=30.0, gt=0, description="until the coordinator's response headers; "
                                                                      "then 504")
    stream_idle_timeout_s: Number = Field(default=300.0, gt=0, description="longest silence inside a response body "
                                                                           "(streams have no total timeout)")
    max_connections: Count = Field(default=100, ge=1, description="pooled keep-alive connections to the coordinator; "
                                                                  "an open event stream holds one for its whole life")
    health_timeout_s: Number = Field(default=1.0, gt=0, description="the coordinator's /v1/health probe behind our "
                                                                    "/v1/health")
    keepalive_idle_s: Number = Field(default=4.0, gt=0, description="an idle pooled connection is closed before the "
                                                                    "coordinator would close it")
    queue_timeout_s: Number = Field(default=1.0, gt=0, description="all connections busy: the longest a request "
                                                                   "waits for one, then 503 run_coordinator_busy")
    retries: RetryConfig = Field(default_factory=RetryConfig, description="retries of failed coordinator requests")
    stream_share: Annotated[Number, AfterValidator(_fraction)] = Field(
        default=0.75, gt=0, json_schema_extra={"maximum": 1},
        description="the most of max_connections event streams may hold at once; the rest stays for short requests")
    max_response_header_bytes: Count = Field(default=64 * 1024, ge=1024, description="the coordinator's head (and "
                                                                                     "trailer section); larger: 502")
    tls: UpstreamTlsConfig = Field(default_factory=UpstreamTlsConfig, description=(
        "TLS to an https:// coordinator (docs/tls.md)"))

    @model_validator(mode="after")
    def _tls_needs_https(self) -> UpstreamConfig:
        if self.tls.configured and not (self.url or "").startswith("https://"):
            raise problem("upstream.tls is set but upstream.url is not https://", at="tls")
        return self


class RateBackend(StrEnum):
    """`limits.run_start_rate.backend`: where the buckets live."""

    LOCAL = "local"   # in each process: every worker and replica has its own
    REDIS = "redis"   # in the `redis` section's Redis: one bucket per principal for the whole fleet


class RateKey(StrEnum):
    """`limits.run_start_rate.key`: whom a bucket belongs to."""

    SUBJECT = "subject"       # the token's issuer and subject
    TENANT = "tenant"         # the claim named by tenant_claim: a tenant's members share one bucket
    CLIENT_ID = "client_id"   # the OAuth client (`client_id`, else `azp`): every user of one app together


class BackendError(StrEnum):
    """`limits.run_start_rate.on_backend_error`: a run start when Redis cannot answer in time."""

    LOCAL = "local"     # this process's own bucket decides
    OPEN = "open"       # allowed
    CLOSED = "closed"   # 503 rate_limiter_unavailable, retryable


@dataclass(frozen=True, config=_STRICT_KEYS)
class RateConfig(_Model):
    """A per-principal rate limit (GCRA: a bucket of `burst` refilled at `per_second`)."""

    per_second: Number = Field(gt=0, description="tokens added to each subject's bucket per second")
    burst: Count = Field(ge=1, description="the bucket's size: run starts allowed at once after a quiet spell")
    backend: RateBackend = Field(default=RateBackend.LOCAL, description=(
        "local: a bucket per process (with listen.workers N and R replicas a caller gets N x R times the "
        "limit); redis: one bucket per principal in the `redis` section's Redis, shared by the whole fleet"))
    key: RateKey = Field(default=RateKey.SUBJECT, description=(
        "whom a bucket counts: subject (issuer and subject), tenant (the claim tenant_claim names; a token "
        "without it counts by subject) or client_id (the `client_id` claim, else `azp`, else the subject). "
        "Anonymous callers always count by client address"))
    tenant_claim: Text | None = Field(default=None, description="the claim naming a caller's tenant, for "
                                                                "key: tenant (e.g. tenant_id); runs.tenant_claim "
                                                                "when unset")
    on_backend_error: BackendError = Field(default=BackendError.LOCAL, description=(
        "backend: redis, when Redis fails or is slower than redis.timeout_ms: local (this process's own "
        "bucket decides, so one replica still limits), open (allow) or closed (503 rate_limiter_unavailable, "
        "retryable)"))


def _redis_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        raise problem(f"not a redis:// or rediss:// URL: {shown(value)} ({exc})") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise problem(f"not a redis:// or rediss:// URL: {shown(value)}")
    if parts.password:
        raise problem("a password in the URL would be shown by check-config; use redis.password_file")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and int(db) < 1 << 16):
        raise problem(f"the path must be a database number (redis://host:6379/0), got {shown(parts.path)}")
    return value


@dataclass(frozen=True, config=_STRICT_KEYS)
class RedisConfig(_Model):
    """The Redis that holds fleet-wide state (the shared run-start limit)."""

    url: Annotated[Text, AfterValidator(_redis_url)] | None = Field(default=None, description=(
        "redis://host:port/db or rediss:// (TLS); needed by limits.run_start_rate.backend: redis"))
    password_file: Text | None = Field(default=None, description=(
        "a file holding the password (a mounted Kubernetes Secret), read at each new connection, so a "
        "rotation needs no restart; the password is never in the YAML"))
    timeout_ms: Count = Field(default=50, ge=1, le=60_000, description=(
        "a whole Redis decision (waiting for a connection included) must come within it; later, "
        "limits.run_start_rate.on_backend_error decides"))
    key_prefix: Text = Field(default="arpgw", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description=(
        "the start of every key the gateway writes (letters, digits, _ . : -), so gateways can share a Redis"))
    breaker_failures: Count = Field(default=5, ge=1, description=(
        "consecutive failures after which Redis is not asked for breaker_open_s"))
    breaker_open_s: Number = Field(default=5.0, gt=0, description="how long Redis is left alone after "
                                                                  "breaker_failures failures in a row")
    max_connections: Count = Field(default=16, ge=1, le=1024, description=(
        "connections to Redis per worker process; a decision waits for a free one within timeout_ms"))

    @model_validator(mode="after")
    def _password_readable(self) -> RedisConfig:
        # Read here so check-config and start-up name a missing file; each connection reads it again.
        if self.password_file is not None:
            try:
                read_secret(self.password_file)
            except SecretFileError as exc:
                raise problem(exc.reason, at="password_file") from None
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class LimitsConfig(_Model):
    """Request size and time limits."""

    max_body_bytes: Count = Field(default=MIB, gt=0, description="run start and cancel bodies; larger ones get 413")
    header_timeout_s: Number = Field(default=10.0, gt=0, description="a request head must arrive whole within it, or "
                                                                     "the connection closes")
    body_timeout_s: Number = Field(default=10.0, gt=0, description="a body must arrive whole within it once wanted, "
                                                                   "or 408")
    max_header_bytes: Count = Field(default=64 * 1024, ge=1024, description="the request target plus header lines; "
                                                                            "larger heads get 431")
    max_headers: Count = Field(default=100, ge=8, description="header lines per request; more get 431")
    max_buffered_bytes: Count = Field(default=64 * MIB, gt=0, description=(
        "head and body bytes held in memory by all connections together; while full the gateway reads "
        "nothing more, and what stays starved past its header or body timeout gets 503 overloaded. At "
        "least max_body_bytes + max_header_bytes"))
    send_timeout_s: Number = Field(default=60.0, gt=0, description="unread answer bytes must drain within it, else "
                                                                   "the connection is aborted")
    run_start_rate: RateConfig | None = Field(default=None, description=(
        "a token bucket per principal on run starts (e.g. {per_second: 2, burst: 10}); over it 429 "
        "rate_limited. Unset: no limit"))
    max_streams_per_principal: Count = Field(default=8, ge=1, description="event streams open at once per principal; "
                                                                          "more get 429")

    @model_validator(mode="after")
    def _holds_one_request(self) -> LimitsConfig:
        if self.max_buffered_bytes < self.max_body_bytes + self.max_header_bytes:
            raise problem(f"must hold at least one whole request: limits.max_body_bytes plus "
                          f"limits.max_header_bytes ({self.max_body_bytes + self.max_header_bytes})",
                          at="max_buffered_bytes")
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class IssuerConfig(_Model):
    """A trusted token issuer."""

    issuer: Annotated[Text, AfterValidator(_issuer_url)] = Field(description=(
        "the exact `iss` a token must carry (compared as a string); an http(s) URL"))
    audiences: Annotated[Texts, AfterValidator(_not_empty("at least one audience is required"))] = Field(
        description="a token's `aud` must name at least one of these")
    jwks_uri: Url | None = Field(default=None, description="where the signing keys are; unset: found by OIDC discovery")
    discovery_url: Url | None = Field(default=None, description="unset: {issuer}/.well-known/openid-configuration")
    algorithms: Annotated[tuple[Annotated[Text, AfterValidator(_algorithm)], ...], BeforeValidator(_comma_list)] = (
        Field(default=("RS256",), description="the JWS algorithms accepted from this issuer: RS256/384/512, "
                                              "PS256/384/512, ES256/384, EdDSA; HS* needs hmac_secret"))
    hmac_secret: Text | None = Field(default=None, description="the one HMAC key, needed for HS* algorithms (never "
                                                               "from a JWKS); at least 32 bytes; never printed")
    require_certificate_binding: bool = Field(default=False, description=(
        "RFC 8705: this issuer's tokens carry cnf.x5t#S256, which must be the SHA-256 thumbprint of the "
        "client certificate on the connection (needs listen.tls.client_auth optional or required)"))

    @property
    def discovery(self) -> str:
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    @model_validator(mode="after")
    def _hmac(self) -> IssuerConfig:
        found = []
        if any(a in HMAC_ALGORITHMS for a in self.algorithms) and not self.hmac_secret:
            found.append(("algorithms", "HMAC algorithms need an explicit hmac_secret"))
        if self.hmac_secret and len(self.hmac_secret.encode()) < 32:
            found.append(("hmac_secret", "must be at least 32 bytes"))
        if found:
            raise problems(found)
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class AccessRule(_Model):
    """Scope and claim requirements of a forwarded route."""

    path: Annotated[Text, AfterValidator(_forwarded_route)] = Field(description=(
        "a forwarded route template, e.g. /v1/runs/{run_id}:cancel"))
    methods: Annotated[tuple[Annotated[Text, AfterValidator(str.upper)], ...], BeforeValidator(_comma_list)] = (
        Field(default=(), description="the methods it applies to; empty: all of the route's methods"))
    scopes: Texts = Field(default=(), description="scopes (scope or scp) the token must all carry")
    claims: Claims = Field(default=(), json_schema_extra={"default": {}}, description=(
        "claim: value pairs the token must all carry, e.g. {realm_access.roles: arp-runner}"))


@dataclass(frozen=True, config=_STRICT_KEYS)
class ExchangeConfig(_Model):
    """The STS, for auth.forward_token: exchange (RFC 8693)."""

    token_endpoint: Url | None = Field(default=None, description="the STS's OAuth token endpoint (required for "
                                                                 "forward_token: exchange)")
    client_id: Text | None = Field(default=None, description="the gateway's client at the STS")
    client_secret: Text | None = Field(default=None, description="its secret; never logged or printed")
    client_secret_file: Text | None = Field(default=None, description=(
        "a file holding the secret (a mounted Kubernetes Secret), read at start-up and re-read when it "
        "changes, so a rotation needs no restart; set one of client_secret and client_secret_file"))
    audience: Text = Field(default="arp-run-coordinator", description="the audience asked for: the coordinator")
    scope: Text | None = Field(default=None, description="scopes asked for, space-separated; unset: the STS's default")

    @model_validator(mode="before")
    @classmethod
    def _secret_from_file(cls, data: Any) -> Any:
        # Only input from a file or the environment names a file to read; an ExchangeConfig built in
        # code is taken as given (the exchanger re-reads the file itself).
        if isinstance(data, ArgsKwargs) or not isinstance(data, dict):
            return data
        path, secret = data.get("client_secret_file"), data.get("client_secret")
        if not isinstance(path, str) or not path:
            return data
        if secret is not None:
            raise problem("set either auth.exchange.client_secret or auth.exchange.client_secret_file, not both",
                          at="client_secret_file")
        try:
            return {**data, "client_secret": read_secret(path)}
        except SecretFileError as exc:
            raise problem(exc.reason, at="client_secret_file") from None


@dataclass(frozen=True, config=_STRICT_KEYS)
class AuthConfig(_Model):
    """Authentication and authorization."""

    mode: AuthMode = Field(default=AuthMode.REQUIRED, description="required, optional (no token: the anonymous "
                                                                  "principal) or disabled (the dev subject)")
    realm: Text = Field(default="arp-run-gateway", description="the realm in WWW-Authenticate challenges")
    issuers: tuple[IssuerConfig, ...] = Field(default=(), description="trusted token issuers, looked up by a token's "
                                                                      "`iss`; the environment overrides the first")
    clock_skew_s: Number = Field(default=60.0, ge=0, description="leeway for exp, nbf and iat against our clock")
    exempt_paths: Texts = Field(default=("/v1/health", "/v1/version"), description="raw paths answered without a "
                                                                                   "token")
    dev_subject: Text = Field(default="dev", description="the subject every request acts as with auth disabled")
    anonymous_subject: Text = Field(default="anonymous", description="the subject of tokenless requests in optional "
                                                                     "mode")
    jwks_cache_ttl_s: Number = Field(default=300.0, gt=0, description="how long fetched keys are fresh when the IdP "
                                                                      "sends no max-age")
    jwks_min_ttl_s: Number = Field(default=30.0, gt=0, description="an IdP's max-age (or no-store) is raised to at "
                                                                   "least this")
    jwks_max_ttl_s: Number = Field(default=86400.0, gt=0, description="and lowered to at most this")
    jwks_refetch_cooldown_s: Number = Field(default=30.0, ge=0, description="at most one unknown-kid refetch per "
                                                                            "issuer in this time")
    jwks_max_stale_s: Number = Field(default=86400.0, gt=0, description="keys older than this (IdP down) are not "
                                                                        "used: 503 instead")
    jwks_fetch_timeout_s: Number = Field(default=5.0, gt=0, description="one JWKS or discovery request, whole")
    token_cache_size: Count = Field(default=10000, ge=0, description="verified tokens remembered (LRU); 0 verifies "
                                                                     "every request")
    max_token_bytes: Count = Field(default=8192, gt=0, description="longer bearer tokens are refused before any "
                                                                   "parsing")
    identity_header_prefix: Annotated[Text, AfterValidator(_header_prefix)] = Field(
        default="X-Auth-", description="identity headers sent upstream; callers' headers with it are stripped")
    claim_headers: ClaimHeaders = Field(default=(), json_schema_extra={"default": {}}, description=(
        "claim: header pairs also sent upstream, e.g. {email: X-Auth-Email}"))
    forward_token: ForwardToken = Field(default=ForwardToken.PASSTHROUGH, description="the token the coordinator "
                                                                                      "receives: passthrough, strip "
                                                                                      "or exchange (RFC 8693)")
    exchange: ExchangeConfig = Field(default_factory=ExchangeConfig, description="the STS, for forward_token: exchange")
    rules: tuple[AccessRule, ...] = Field(default=(), description="per-route scope and claim requirements")
    cors_preflight_bypass: bool = Field(default=False, description="forward tokenless CORS preflights (OPTIONS) to "
                                                                   "the coordinator")

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        found = []
        if self.jwks_min_ttl_s > self.jwks_max_ttl_s:
            found.append(("jwks_min_ttl_s", "must not exceed auth.jwks_max_ttl_s"))
        if self.forward_token == ForwardToken.EXCHANGE:
            x = self.exchange
            for key in ("token_endpoint", "client_id", "client_secret"):
                if not getattr(x, key) and not (key == "client_secret" and x.client_secret_file):
                    also = " (or auth.exchange.client_secret_file)" if key == "client_secret" else ""
                    found.append((f"exchange.{key}", f"required{also} when auth.forward_token is 'exchange'"))
        if found:
            raise problems(found)
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class MetricsConfig(_Model):
    """Prometheus metrics, /livez and /readyz."""

    enabled: bool = Field(default=True, description="serve Prometheus metrics at all")
    host: Text = Field(default="127.0.0.1", description="the metrics listener's address: the public port never "
                                                        "exposes metrics")
    port: Count = Field(default=9464, ge=0, le=65535, description="its port; 0 serves /metrics on the main listener "
                                                                  "instead; with listen.workers N, worker i listens "
                                                                  "on port + i")


@dataclass(frozen=True, config=_STRICT_KEYS)
class LoggingConfig(_Model):
    """JSON logs on stdout."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = Field(
        default="info", description="debug, info, warning or error")
    access_log: bool = Field(default=True, description="one JSON line per request on stdout")
    log_subject: bool = Field(default=False, description="put the caller's subject in access log lines (personal data)")


def _policy_file(path: str) -> str:
    try:
        load_policy(path)
    except PolicyFileError as exc:
        raise problem(str(exc)) from None
    return path


@dataclass(frozen=True, config=_STRICT_KEYS)
class RunsConfig(_Model):
    """Runs and their callers: the verified caller bound into each run start, and who may act on a run."""

    bind_identity: bool = Field(default=False, description=(
        "write the verified caller into each run start's run_context (identity, actor, tenant_id, "
        "trace.request_id) before it is forwarded"))
    identity_claims: Texts = Field(default=(), description=(
        "token claims copied into run_context.identity beside iss and sub, when the token has them"))
    tenant_claim: Text | None = Field(default=None, description=(
        "the token claim that names the caller's tenant (run_context.tenant_id); a token without it "
        "may not start runs; unset: no tenant, and a client-sent tenant_id is a conflict"))
    on_conflict: OnConflict = Field(default=OnConflict.REFUSE, description=(
        "a client-sent identity, actor or tenant_id unlike the gateway's: refuse (403 "
        "run_context_mismatch) or overwrite"))
    access: RunAccess = Field(default=RunAccess.ANY, description=(
        "who may get, cancel and stream a run: any authenticated caller, its owner (the iss and sub "
        "bound into it), or its tenant's members; others get the 404 of an unknown run"))
    admin_scope: Text | None = Field(default=None, description=(
        "a token with this scope may act on every run, whatever runs.access says"))
    owner_cache_size: Count = Field(default=100_000, ge=1, description=(
        "run ids whose owner is remembered (LRU); a run not in it is looked up with one GET to the "
        "coordinator"))

    @model_validator(mode="after")
    def _consistent(self) -> RunsConfig:
        if self.access == RunAccess.TENANT and self.tenant_claim is None:
            raise problem("required when runs.access is 'tenant'", at="tenant_claim")
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class AuthorizationConfig(_Model):
    """Finer per-run rules: an arp-policy document evaluated on every run route."""

    policy_file: Annotated[Text, AfterValidator(_policy_file)] | None = Field(default=None, description=(
        "an arp-policy JSON document (actions run:Start, run:Get, run:Cancel, run:ReadEvents); every "
        "run-route request must also be allowed by it; unset: no policy"))


def _yaml_off(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false.
    return "off" if value is False else value


@dataclass(frozen=True, config=_STRICT_KEYS)
class AuditConfig(_Model):
    """The audit trail: one JSON record per decision on a run route, written off the request path."""

    sink: Annotated[AuditSink, BeforeValidator(_yaml_off)] = Field(default=AuditSink.OFF, description=(
        "off (no audit trail, no cost), stdout (beside the access log) or file (audit.path)"))
    path: Text | None = Field(default=None, description=(
        "the audit file, appended to (created 0640); required with sink: file, its directory must exist. "
        "Reopened when its inode changes (logrotate's rename and create) and on SIGHUP"))
    on_full: AuditOnFull = Field(default=AuditOnFull.DROP, description=(
        "when the queue is full or the sink cannot be written: drop (count arp_gateway_audit_dropped_total, "
        "warn) or refuse (run starts and cancels get 503 audit_unavailable until a write succeeds)"))
    queue_size: Count = Field(default=10000, ge=1, description="records held for the writer; beyond it on_full "
                                                               "applies")

    @model_validator(mode="after")
    def _where(self) -> AuditConfig:
        if self.sink == AuditSink.FILE:
            if self.path is None:
                raise problem("required when audit.sink is 'file'", at="path")
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise problem(f"its directory {shown(directory)} does not exist", at="path")
            if os.path.isdir(self.path):
                raise problem(f"{shown(self.path)} is a directory; name a file in it", at="path")
        return self


@dataclass(frozen=True, config=_STRICT_KEYS)
class GatewayConfig(_Model):
    """The ARP Run Gateway's configuration."""

    listen: ListenConfig = Field(default_factory=ListenConfig, description="the public listener")
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig, description="the Run Coordinator behind it")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="request size and time limits")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="authentication and authorization")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="log level and access log")
    runs: RunsConfig = Field(default_factory=RunsConfig, description="identity bound into runs, and who may act "
                                                                     "on a run")
    authorization: AuthorizationConfig = Field(default_factory=AuthorizationConfig, description=(
        "per-run rules from an arp-policy document"))
    audit: AuditConfig = Field(default_factory=AuditConfig, description="the audit trail of run-route decisions")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="the Redis holding fleet-wide state")
    shutdown_grace_s: Number = Field(default=25.0, ge=0, description="after the listener closes, in-flight requests "
                                                                     "get this long to finish")
    drain_delay_s: Number = Field(default=5.0, ge=0, description="after SIGTERM, /readyz fails this long before the "
                                                                 "listener closes")

    @model_validator(mode="after")
    def _whole_gateway(self) -> GatewayConfig:
        # Checked here, not in AuthConfig: an AuthConfig built in code without issuers is fine
        # (tests, tools); a gateway started from a configuration is not.
        found = []
        auth = self.auth
        if auth.mode != AuthMode.DISABLED and not auth.issuers:
            found.append(("auth.issuers", f"auth.mode is {auth.mode.value!r} but no issuer is configured "
                                          "(set auth.issuers or ARP_AUTH_ISSUER, or auth.mode: disabled)"))
        if any(i.require_certificate_binding for i in auth.issuers) and \
                self.listen.tls.client_auth == ClientAuth.NONE:
            found.append(("auth.issuers", "require_certificate_binding needs client certificates: set "
                                          "listen.tls.client_auth to optional or required"))
        if self.limits.max_header_bytes <= auth.max_token_bytes + 256:
            found.append(("limits.max_header_bytes", f"must leave room for a token of auth.max_token_bytes "
                                                     f"({auth.max_token_bytes}) plus other headers, so an "
                                                     "oversized token gets its 401"))
        rate = self.limits.run_start_rate
        if rate is not None and rate.backend == RateBackend.REDIS and self.redis.url is None:
            found.append(("redis.url", "limits.run_start_rate.backend is 'redis' but no Redis is configured"))
        if rate is not None and rate.key == RateKey.TENANT and not (rate.tenant_claim or self.runs.tenant_claim):
            found.append(("limits.run_start_rate.tenant_claim", "key: tenant needs the claim that names the tenant "
                                                                "(here or in runs.tenant_claim)"))
        if found:
            raise problems(found)
        return self

