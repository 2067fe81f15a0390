"""Who may act on a run, decided from the run's owner and the caller (gateway/runaccess.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from arp_policy import Policy

from proxy.arp.answers import Answer
from proxy.arp.routes import CANCEL_RUN
from proxy.arp.runcontext import NOBODY, RunOwner
from proxy.auth.principal import Principal, PrincipalKind
from proxy.gateway.runaccess import RunGuard
from proxy.util.certificates import PeerCertificate
from tests.support.gateway import gateway_config

POLICIES = Path(__file__).resolve().parents[3] / "config" / "policies"
ISS = "https://idp.example"
HANDED, PAUSED = Answer(0, b""), Answer(0, b"")


def guard(**runs: Any) -> RunGuard:
    cfg = gateway_config("http://127.0.0.1:9", runs=runs)
    return RunGuard(cfg, None, None, handed=HANDED, paused=PAUSED, proceed=lambda ex, answer: None)  # type: ignore[arg-type]


def exchange(principal: Principal | None, certificate: PeerCertificate | None = None) -> Any:
    request = SimpleNamespace(request_id="rid", path="/v1/runs/run_1:cancel", client_certificate=certificate)
    return SimpleNamespace(route=CANCEL_RUN, outcome=SimpleNamespace(principal=principal), request=request,
                           run_id="run_1", decision=None, reason=None, statement_id=None)


def person(sub: str, tenant: str | None = None, scopes: frozenset[str] = frozenset(), iss: str = ISS) -> Principal:
    claims = {"iss": iss, "sub": sub, **({"tenant": tenant} if tenant else {})}
    return Principal(sub, iss, scopes, claims, "token")


ALICES_RUN = RunOwner(ISS, "alice", "A")


@pytest.mark.parametrize("caller, allowed, reason", [
    (person("alice"), True, "owner"),
    (person("bob"), False, "not_owner"),
    (person("alice", iss="https://other.example"), False, "not_owner"),   # the same sub at another issuer
    (person("root", scopes=frozenset({"admin"})), True, "admin"),
    (Principal("anonymous", kind=PrincipalKind.ANONYMOUS), False, "not_owner"),
])
def test_owner_mode(caller, allowed, reason):
    ex = exchange(caller)
    answer = guard(access="owner", admin_scope="admin")._decide(ex, ALICES_RUN)
    assert (answer is None) is allowed and ex.reason == reason
    if not allowed:
        assert answer.status == 404 and json.loads(answer.body)["error"]["code"] == "run_not_found"


@pytest.mark.parametrize("caller, allowed", [
    (person("carol", tenant="A"), True), (person("bob", tenant="B"), False), (person("dave"), False)])
def test_tenant_mode(caller, allowed):
    ex = exchange(caller)
    assert (guard(access="tenant", tenant_claim="tenant")._decide(ex, ALICES_RUN) is None) is allowed


def test_a_run_with_no_bound_identity_is_reached_by_the_admin_scope_alone():
    g = guard(access="owner", admin_scope="admin")
    assert g._decide(exchange(person("alice")), NOBODY) is not None
    assert g._decide(exchange(Principal("anonymous", kind=PrincipalKind.ANONYMOUS)), NOBODY) is not None
    assert g._decide(exchange(person("root", scopes=frozenset({"admin"}))), NOBODY) is None


def test_the_policy_hash_is_logged_at_start(caplog):
    path = POLICIES / "owners-only.json"
    with caplog.at_level(logging.INFO, logger="proxy.gateway.runaccess"):
        RunGuard(gateway_config("http://127.0.0.1:9", authorization={"policy_file": str(path)}), None, None,  # type: ignore[arg-type]
                 handed=HANDED, paused=PAUSED, proceed=lambda ex, answer: None)
    [loaded] = [r for r in caplog.records if getattr(r, "event", None) == "policy_loaded"]
    assert loaded.policy_hash == Policy.load(path).policy_hash


AGENT = PeerCertificate("x5t", "O=ARP Test,CN=agent", ("spiffe://arp.test/ns/a/agent", "spiffe://arp.test/ops"))


@pytest.mark.parametrize("condition, certificate, allowed", [
    ({"StringLike": {"client_cert.uri": "spiffe://arp.test/ns/a/*"}}, AGENT, True),
    ({"StringLike": {"client_cert.uri": "spiffe://arp.test/ops"}}, AGENT, False),   # uri: the first SAN URI only
    ({"StringEquals": {"client_cert.uris": "spiffe://arp.test/ops"}}, AGENT, True),  # uris: any of them
    ({"StringEquals": {"client_cert.subject": "O=ARP Test,CN=agent"}}, AGENT, True),
    ({"StringLike": {"client_cert.subject": "*"}}, None, False),     # no certificate: the keys are absent
    ({"StringLike": {"client_cert.uri": "*"}}, PeerCertificate("x5t", "CN=plain", ()), False),
])
def test_the_client_certificate_in_the_policy_context(tmp_path, condition, certificate, allowed):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"Version": "2025-01-01", "Statement": [
        {"Effect": "Allow", "Action": "run:Cancel", "Resource": "run:*", "Condition": condition}]}))
    cfg = gateway_config("http://127.0.0.1:9", runs={"access": "any"}, authorization={"policy_file": str(path)})
    g = RunGuard(cfg, None, None, handed=HANDED, paused=PAUSED, proceed=lambda ex, answer: None)  # type: ignore[arg-type]
    ex = exchange(person("alice"), certificate)
    assert (g._decide(ex, ALICES_RUN) is None) is allowed
    assert ex.reason == ("policy_allowed" if allowed else "policy_denied")
