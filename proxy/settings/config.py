"""Gateway configuration: one frozen object built from YAML, environment and flags.

Precedence is flag > environment > YAML > built-in default. The keys, their types, defaults and
constraints are declared once, in models.py; this module reads the file, overlays the environment
(environment.py) and the flags, validates the whole, and reports every problem as one
`key.path: problem` line (problems.py), so a bad file fails at start-up naming each key at once.

    cfg = load_config(Path("config/gateway.yaml"), os.environ, {"listen.port": 9000})
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import TypeAdapter, ValidationError

from .environment import KEYCLOAK_DEV_ISSUER, PROFILES, apply_environment, set_path
from .models import (
    AUTH_MODES,
    EVENT_LOOPS,
    FORWARD_TOKEN_MODES,
    HMAC_ALGORITHMS,
    LOG_LEVELS,
    MIB,
    SECRET_KEYS,
    SUPPORTED_ALGORITHMS,
    AccessRule,
    AuthConfig,
    AuthMode,
    EventLoop,
    ExchangeConfig,
    ForwardToken,
    GatewayConfig,
    IssuerConfig,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    MetricsConfig,
    RateConfig,
    RetryConfig,
    UpstreamConfig,
    normalize_coordinator_url,
)
from .problems import describe

__all__ = [
    "AUTH_MODES", "DEV_ISSUER_AUDIENCE", "DEV_ISSUER_PORT", "EVENT_LOOPS", "FORWARD_TOKEN_MODES",
    "HMAC_ALGORITHMS", "KEYCLOAK_DEV_ISSUER", "LOG_LEVELS", "MIB", "PROFILES", "SECRET_KEYS",
    "SUPPORTED_ALGORITHMS", "AccessRule", "AuthConfig", "AuthMode", "ConfigError", "EventLoop",
    "ExchangeConfig", "ForwardToken", "GatewayConfig", "IssuerConfig", "LimitsConfig", "ListenConfig",
    "LoggingConfig", "MetricsConfig", "RateConfig", "RetryConfig", "UpstreamConfig", "apply_environment",
    "build_config", "config_warnings", "load_config", "normalize_coordinator_url", "read_yaml", "redacted",
]

# `arp-gateway dev` and `token` defaults. They live here, not in proxy.dev, so that building the
# command line (for `serve` too) loads no dev code.
DEV_ISSUER_AUDIENCE = "arp-run-gateway"
DEV_ISSUER_PORT = 8089

_GATEWAY = TypeAdapter(GatewayConfig)


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one `key.path: reason` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def build_config(raw: Any, origins: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validates a raw mapping (YAML with overrides applied) into a GatewayConfig."""
    try:
        return _GATEWAY.validate_python({} if raw is None else raw)
    except ValidationError as exc:
        raise ConfigError(describe(exc, origins or {})) from None
    except RecursionError:
        raise ConfigError(["<root>: nested too deeply"]) from None


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


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"--config: cannot read {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"--config: {path} is not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([f"--config: {_yaml_problem(path, exc)}"]) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # PyYAML lets int() refuse a number of over 4300 digits (ValueError) and deep nesting
        # overflow the stack; both are a bad file, not a crash.
        reason = " ".join(str(exc).split()) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise ConfigError([f"--config: {path} is not valid YAML: {reason}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: {path} must hold a mapping, not {type(raw).__name__}"])
    return raw


def _yaml_problem(path: Path, exc: yaml.MarkedYAMLError) -> str:
    """`FILE:LINE:COLUMN: not valid YAML: what`, on one line, as editors and compilers print it
    (PyYAML's own text names `<unicode string>` and spans five lines)."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    what = exc.problem or exc.context or "cannot be parsed"
    if exc.context and exc.problem and exc.context_mark:
        what += f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
    return f"{where}: not valid YAML: {' '.join(what.split())}"


def load_config(path: Path | None, env: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> GatewayConfig:
    """YAML (optional) < environment < command-line flags, validated as a whole."""
    raw = read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}
    apply_environment(raw, env, origins)
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_path(raw, dotted, value)
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
