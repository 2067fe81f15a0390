"""Access rules: which verified principals may call which route.

Rules come from `auth.rules` in YAML, keyed by route template and method. A
rule passes when the principal holds every listed scope (`scope` or `scp`) and
every listed claim matches (a list claim must contain the value; dotted names
reach into nested claims such as Keycloak's `realm_access.roles`, unless a claim
carries that exact name, as Auth0's namespaced `https://example.com/roles` do).

    policy = AccessPolicy(cfg.auth.rules)
    denial = policy.check("/v1/runs", "POST", principal)   # None when allowed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings.config import AccessRule
from .principal import Principal


@dataclass(frozen=True, slots=True)
class Denial:
    missing_scopes: tuple[str, ...]
    failed_claims: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "insufficient_scope" if self.missing_scopes else "claim_mismatch"


class AccessPolicy:
    def __init__(self, rules: tuple[AccessRule, ...]) -> None:
        self._rules: dict[str, list[AccessRule]] = {}
        for rule in rules:
            self._rules.setdefault(rule.path, []).append(rule)

    def applies(self, template: str) -> bool:
        return template in self._rules

    def check(self, template: str, method: str, principal: Principal) -> Denial | None:
        rules = self._rules.get(template)
        if not rules:
            return None
        missing: list[str] = []
        failed: list[str] = []
        for rule in rules:
            if rule.methods and method not in rule.methods:
                continue
            missing.extend(s for s in rule.scopes if s not in principal.scopes)
            failed.extend(f"{name}={want}" for name, want in rule.claims
                          if not _claim_matches(principal.claims, name, want))
        if missing or failed:
            return Denial(tuple(missing), tuple(failed))
        return None


def _claim_matches(claims: dict[str, Any], dotted: str, want: str) -> bool:
    # A claim literally named with dots (Auth0's namespaced "https://example.com/roles") is
    # taken as is; only otherwise do the dots reach into nested objects.
    if dotted in claims:
        value: Any = claims[dotted]
    else:
        value = claims
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
    if isinstance(value, list):
        return any(str(v) == want for v in value)
    if isinstance(value, bool):
        return str(value).lower() == want.lower()
    return str(value) == want
