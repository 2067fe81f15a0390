"""The ARP_AUTH_* / JARVIS_* environment overlay, applied to the raw YAML mapping before validation.

The variables are the ones the ARP security profiles and the JARVIS Run Gateway define, with their
semantics: a profile presets auth.mode (ARP_AUTH_MODE still wins), the issuer variables override the
first entry of auth.issuers, a secret from the environment replaces the YAML's in either form, and
the Keycloak token endpoint is derived from the issuer when none is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROFILES = ("dev-insecure", "dev-secure-keycloak", "enterprise")
KEYCLOAK_DEV_ISSUER = "http://localhost:8080/realms/arp-dev"

_DIRECT = {
    "JARVIS_RUN_COORDINATOR_URL": "upstream.url",
    "JARVIS_RUN_COORDINATOR_AUDIENCE": "auth.exchange.audience",
    "LOG_LEVEL": "logging.level",
}
_ISSUER = {
    "ARP_AUTH_ISSUER": "issuer",
    "ARP_AUTH_JWKS_URI": "jwks_uri",
    "ARP_AUTH_OIDC_DISCOVERY_URL": "discovery_url",
    "ARP_AUTH_ALGORITHMS": "algorithms",
}
_PLAIN = {
    "ARP_AUTH_CLOCK_SKEW_SECONDS": "auth.clock_skew_s",
    "ARP_AUTH_EXEMPT_PATHS": "auth.exempt_paths",
    "ARP_AUTH_DEV_SUBJECT": "auth.dev_subject",
    "ARP_AUTH_ANONYMOUS_SUBJECT": "auth.anonymous_subject",
    "ARP_AUTH_CLIENT_ID": "auth.exchange.client_id",
    "ARP_AUTH_CLIENT_SECRET": "auth.exchange.client_secret",
    "ARP_AUTH_CLIENT_SECRET_FILE": "auth.exchange.client_secret_file",
    "ARP_AUTH_TOKEN_ENDPOINT": "auth.exchange.token_endpoint",
}


def variables() -> dict[str, list[str]]:
    """Key path (`auth.issuers[].issuer` for the first issuer's keys) -> the variables that set it."""
    found: dict[str, list[str]] = {}
    for name, path in {**_DIRECT, **_PLAIN}.items():
        found.setdefault(path, []).append(name)
    for name, key in _ISSUER.items():
        found.setdefault(f"auth.issuers[].{key}", []).append(name)
    found["auth.issuers[].audiences"] = ["ARP_AUTH_AUDIENCE", "ARP_AUTH_SERVICE_ID"]
    found["auth.mode"] = ["ARP_AUTH_MODE", "ARP_AUTH_PROFILE"]
    return found


def set_path(raw: dict, dotted: str, value: Any) -> None:
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
        set_path(raw, path, value)
        origins[path] = name

    for name, path in _DIRECT.items():
        if v := env.get(name):
            put(path, name, v)

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

    audience = env.get("ARP_AUTH_AUDIENCE") or env.get("ARP_AUTH_SERVICE_ID")
    if audience or any(env.get(name) for name in _ISSUER):
        first = _first_issuer(raw)
        for name, key in _ISSUER.items():
            if v := env.get(name):
                first[key] = v
                origins[f"auth.issuers[0].{key}"] = name
        if audience:
            first["audiences"] = audience
            origins["auth.issuers[0].audiences"] = (
                "ARP_AUTH_AUDIENCE" if env.get("ARP_AUTH_AUDIENCE") else "ARP_AUTH_SERVICE_ID")

    exchange = raw.get("auth", {}).get("exchange") if isinstance(raw.get("auth"), dict) else None
    if isinstance(exchange, dict):
        # The environment outranks the YAML: a secret from it replaces the YAML's, in either form.
        if env.get("ARP_AUTH_CLIENT_SECRET"):
            exchange.pop("client_secret_file", None)
        if env.get("ARP_AUTH_CLIENT_SECRET_FILE"):
            exchange.pop("client_secret", None)
    for name, path in _PLAIN.items():
        if v := env.get(name):
            put(path, name, v)
    # JARVIS derives the Keycloak token endpoint from the issuer when none is given.
    if env.get("ARP_AUTH_CLIENT_ID") and not env.get("ARP_AUTH_TOKEN_ENDPOINT") and env.get("ARP_AUTH_ISSUER"):
        put("auth.exchange.token_endpoint", "ARP_AUTH_ISSUER",
            env["ARP_AUTH_ISSUER"].rstrip("/") + "/protocol/openid-connect/token")
