"""AccessPolicy: route rules on scopes and claims, as parsed from `auth.rules`."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.auth.access import AccessPolicy
from proxy.settings.config import AccessRule, ConfigError, build_config
from proxy.auth.principal import Principal, scopes_of

RUNS = "/v1/runs"
RUN = "/v1/runs/{run_id}"
CANCEL = "/v1/runs/{run_id}:cancel"


def principal(**claims: Any) -> Principal:
    claims.setdefault("sub", "alice")
    return Principal(subject=claims["sub"], issuer="https://idp.example", scopes=scopes_of(claims),
                     claims=claims, token="t", kind="token")


def policy(*rules: dict[str, Any]) -> AccessPolicy:
    """Rules go through the YAML parser, so the tests also pin what a config file means."""
    return AccessPolicy(build_config({"auth": {"mode": "disabled", "rules": list(rules)}}).auth.rules)


WRITE = {"path": RUNS, "methods": ["POST"], "scopes": ["runs:write"]}


def test_no_rules_allow_everything() -> None:
    assert AccessPolicy(()).check(RUNS, "POST", principal()) is None
    assert not AccessPolicy(()).applies(RUNS)


def test_scope_string_claim() -> None:
    p = policy(WRITE)
    assert p.applies(RUNS)
    assert p.check(RUNS, "POST", principal(scope="runs:read runs:write")) is None
    denial = p.check(RUNS, "POST", principal(scope="runs:read"))
    assert denial is not None
    assert denial.missing_scopes == ("runs:write",) and denial.failed_claims == ()
    assert denial.reason == "insufficient_scope"


@pytest.mark.parametrize("scopes", ["runs:writer", "RUNS:WRITE", "runs:write:all", "runs", ""])
def test_scopes_match_exactly(scopes: str) -> None:
    assert policy(WRITE).check(RUNS, "POST", principal(scope=scopes)) is not None


def test_scp_list_and_scp_string() -> None:
    p = policy(WRITE)
    assert p.check(RUNS, "POST", principal(scp=["runs:read", "runs:write"])) is None
    assert p.check(RUNS, "POST", principal(scp="runs:write")) is None
    assert p.check(RUNS, "POST", principal(scp=["runs:read"])) is not None
    assert p.check(RUNS, "POST", principal()) is not None


def test_all_listed_scopes_are_required() -> None:
    p = policy({"path": RUNS, "scopes": ["runs:write", "runs:admin"]})
    denial = p.check(RUNS, "POST", principal(scope="runs:write"))
    assert denial is not None and denial.missing_scopes == ("runs:admin",)
    assert p.check(RUNS, "POST", principal(scope="runs:admin runs:write")) is None


def test_methods_filter() -> None:
    p = policy({"path": RUN, "methods": ["delete"], "scopes": ["runs:delete"]})  # lower case in YAML is fine
    assert p.check(RUN, "GET", principal()) is None
    assert p.check(RUN, "DELETE", principal()) is not None
    # No methods: the rule covers every method.
    p = policy({"path": RUN, "scopes": ["runs:read"]})
    assert p.check(RUN, "GET", principal()) is not None
    assert p.check(RUN, "HEAD", principal()) is not None


def test_rules_only_apply_to_their_route() -> None:
    p = policy(WRITE)
    for template in (RUN, CANCEL, "/v1/runs/{run_id}/events"):
        assert p.check(template, "POST", principal()) is None
        assert not p.applies(template)


def test_claim_string_and_list() -> None:
    p = policy({"path": RUNS, "claims": {"roles": "arp-runner"}})
    assert p.check(RUNS, "POST", principal(roles="arp-runner")) is None
    assert p.check(RUNS, "POST", principal(roles=["viewer", "arp-runner"])) is None
    for roles in (["viewer"], "arp-runner-lite", [], None, {"arp-runner": True}):
        denial = p.check(RUNS, "POST", principal(roles=roles))
        assert denial is not None, roles
        assert denial.failed_claims == ("roles=arp-runner",) and denial.reason == "claim_mismatch"


def test_nested_dotted_claim_keycloak_realm_roles() -> None:
    p = policy({"path": RUNS, "methods": ["POST"], "claims": {"realm_access.roles": "arp-runner"}})
    assert p.check(RUNS, "POST", principal(realm_access={"roles": ["offline_access", "arp-runner"]})) is None
    assert p.check(RUNS, "POST", principal(realm_access={"roles": ["offline_access"]})) is not None
    assert p.check(RUNS, "POST", principal(realm_access=["arp-runner"])) is not None
    assert p.check(RUNS, "POST", principal(realm_access={})) is not None
    assert p.check(RUNS, "POST", principal()) is not None
    # A top-level claim of the same last name is not the nested one.
    assert p.check(RUNS, "POST", principal(roles=["arp-runner"])) is not None


def test_deeper_nesting() -> None:
    p = policy({"path": RUNS, "claims": {"resource_access.arp-gateway.roles": "runner"}})
    good = {"resource_access": {"arp-gateway": {"roles": ["runner"]}}}
    assert p.check(RUNS, "POST", principal(**good)) is None
    assert p.check(RUNS, "POST", principal(resource_access={"other": {"roles": ["runner"]}})) is not None


def test_namespaced_claim_name_containing_dots() -> None:
    """Auth0 requires custom claims named by URL (https://arp.example.com/roles): the dots are not nesting."""
    p = policy({"path": RUNS, "claims": {"https://arp.example.com/roles": "runner"}})
    assert p.check(RUNS, "POST", principal(**{"https://arp.example.com/roles": ["runner"]})) is None
    assert p.check(RUNS, "POST", principal(**{"https://arp.example.com/roles": ["viewer"]})) is not None


def test_boolean_and_number_claims() -> None:
    p = policy({"path": RUNS, "claims": {"email_verified": True, "tier": 3}})
    assert p.check(RUNS, "POST", principal(email_verified=True, tier=3)) is None
    assert p.check(RUNS, "POST", principal(email_verified=False, tier=3)) is not None
    assert p.check(RUNS, "POST", principal(email_verified=True, tier=2)) is not None
    assert p.check(RUNS, "POST", principal(email_verified="yes", tier=3)) is not None


def test_scope_and_claim_failures_are_reported_together() -> None:
    p = policy({"path": RUNS, "methods": ["POST"], "scopes": ["runs:write"]},
               {"path": RUNS, "methods": ["POST"], "claims": {"realm_access.roles": "arp-runner"}})
    denial = p.check(RUNS, "POST", principal(scope="runs:read"))
    assert denial is not None
    assert denial.missing_scopes == ("runs:write",)
    assert denial.failed_claims == ("realm_access.roles=arp-runner",)
    assert denial.reason == "insufficient_scope"
    both = principal(scope="runs:write", realm_access={"roles": ["arp-runner"]})
    assert p.check(RUNS, "POST", both) is None


def test_anonymous_principal_holds_nothing() -> None:
    anonymous = Principal("anonymous", kind="anonymous")
    assert policy(WRITE).check(RUNS, "POST", anonymous) is not None
    assert policy({"path": RUNS, "claims": {"roles": "x"}}).check(RUNS, "POST", anonymous) is not None


def test_rule_for_unknown_route_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"auth.rules\[0\].path"):
        policy({"path": "/v1/node-runs", "scopes": ["x"]})


def test_access_rule_objects_directly() -> None:
    p = AccessPolicy((AccessRule(path=RUNS, methods=("POST",), scopes=("a",), claims=(("team", "red"),)),))
    assert p.check(RUNS, "POST", principal(scope="a", team="red")) is None
    denial = p.check(RUNS, "POST", principal(scope="a", team="blue"))
    assert denial is not None and denial.failed_claims == ("team=red",)
