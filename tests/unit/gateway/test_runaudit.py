"""The audit record's line as gateway/runaudit.py renders it: generated hostile values (claims, a
coordinator's run id, node types, policy statements, trace headers) must each give one line that is
JSON, valid against the shipped record schema, and says exactly what was decided, with no token.

The renderer is driven with the real Principal, AuthOutcome and RunBinder; the trail it hands
lines to is a recorder here (the trail's queue and writer have their own tests in
tests/unit/observability/test_audit.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from proxy.arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, START_RUN
from proxy.arp.runcontext import RunBinder, trace_ids
from proxy.arp.validation import node_type_of
from proxy.auth.authenticator import AuthOutcome, AuthResult
from proxy.auth.principal import Principal
from proxy.gateway.runaudit import RunAudit
from proxy.observability import audit
from proxy.util.clock import FakeClock

VALIDATOR = Draft202012Validator(audit.schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
# Any text a token, a policy file or a coordinator can carry: quotes, backslashes, controls,
# line ends, non-ASCII and lone surrogates (json decodes "\ud800" to one).
HOSTILE = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
# What the edge lets into a target: RFC 3986 characters (edge/protocol.py's _TARGET_CHARS, no "?").
PATH_ID = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@%",
                  min_size=1, max_size=40)
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Recorder:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.lines: list[tuple[bytes, str, str]] = []
        self.failures = 0

    def record(self, line: bytes, counted: tuple[str, str]) -> None:
        self.lines.append((line, *counted))

    def failed_record(self) -> None:
        self.failures += 1


def audit_for(policy_hash: str | None = None) -> tuple[RunAudit, Recorder]:
    trail = Recorder()
    guard = SimpleNamespace(binder=RunBinder(tenant_claim="tenant"),
                            policy=None if policy_hash is None else SimpleNamespace(policy_hash=policy_hash))
    return RunAudit(trail, guard), trail  # type: ignore[arg-type]


def exchange(route: Any, principal: Principal | None, *, run_id: str | None = None, path: str = "/v1/runs",
             decision: str | None = None, reason: str | None = None, statement_id: str | None = None,
             start: Any = None, traceparent: bytes | None = None, client: str = "") -> SimpleNamespace:
    result = AuthResult.ALLOWED if principal is not None else AuthResult.UNAUTHENTICATED
    refusal = None if principal is not None else object()
    outcome = AuthOutcome(principal, refusal, result, "" if principal is not None else "missing_token")  # type: ignore[arg-type]
    request = SimpleNamespace(path=path, request_id="req-1", client=client, conn=SimpleNamespace(peer="127.0.0.1"),
                              traceparent=traceparent)
    return SimpleNamespace(route=route, outcome=outcome, request=request, decision=decision, reason=reason,
                           run_id=run_id, statement_id=statement_id,
                           node_type=node_type_of(start))


def one_record(trail: Recorder) -> dict[str, Any]:
    assert trail.failures == 0 and len(trail.lines) == 1
    line, _, _ = trail.lines.pop()
    text = line.decode("ascii")          # ASCII only: every value escaped, nothing to fail its encoding
    assert text.endswith("\n") and text.count("\n") == 1
    record: dict[str, Any] = json.loads(text)
    VALIDATOR.validate(record)
    assert TOKEN not in text
    return record


@settings(max_examples=300, deadline=None)
@given(iss=HOSTILE, sub=HOSTILE, tenant=HOSTILE, client=HOSTILE, jti=HOSTILE, run_id=HOSTILE,
       node=HOSTILE, version=st.none() | HOSTILE, statement=st.none() | HOSTILE, policy_hash=HOSTILE)
@example(iss='x"}\n{"event":"run.start"', sub="\\", tenant="\ud800", client="\x00", jti="",
         run_id='"},"principal":null,"x":"', node="\u2028", version=None, statement='"', policy_hash="\n")
def test_a_start_record_says_what_the_hostile_values_were(iss: str, sub: str, tenant: str, client: str, jti: str,
                                                          run_id: str, node: str, version: str | None,
                                                          statement: str | None, policy_hash: str) -> None:
    run_audit, trail = audit_for(policy_hash)
    claims = {"sub": sub, "tenant": tenant, "azp": client, "jti": jti}
    principal = Principal(subject=sub, issuer=iss, claims=claims, token=TOKEN)
    start = {"root_node_type_ref": {"node_type_id": node, "version": version}, "input": {"secret": TOKEN}}
    ex = exchange(START_RUN, principal, run_id=run_id, decision="allow", reason="policy_allowed",
                  statement_id=statement, start=start, traceparent=TRACE.encode())
    run_audit.record(ex, 201)  # type: ignore[arg-type]
    record = one_record(trail)
    assert record["event"] == "run.start" and record["decision"] == "allow" and record["status"] == 201
    assert record["reason"] == "policy_allowed"
    assert record["statement_id"] == statement and record["policy_hash"] == policy_hash
    assert record["run_id"] == run_id
    assert record["node_type"] == {"id": node, "version": version}
    assert record["principal"] == {"iss": iss, "sub": sub, "tenant": tenant or None, "client_id": client}
    assert record["token_id"] == (jti or record["token_id"]) and len(record["token_id"]) >= (1 if jti else 16)
    assert record["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert record["request_id"] == "req-1" and record["client_address"] == "127.0.0.1"
    assert "secret" not in json.dumps(record)
    # The same caller and node type again: the kept renderings say the same.
    run_audit.record(ex, 201)  # type: ignore[arg-type]
    assert one_record(trail) == record


@settings(max_examples=200, deadline=None)
@given(route=st.sampled_from([GET_RUN, CANCEL_RUN, RUN_EVENTS]), run_id=PATH_ID, sub=HOSTILE,
       reason=st.sampled_from(["owner", "not_owner", "tenant", "other_tenant", "admin"]) | HOSTILE,
       traceparent=st.binary(max_size=80))
@example(route=GET_RUN, run_id="run_1", sub="bob", reason="not_owner", traceparent=TRACE.encode())
def test_a_run_route_record_names_the_run_of_the_path(route: Any, run_id: str, sub: str, reason: str,
                                                      traceparent: bytes) -> None:
    run_audit, trail = audit_for()
    principal = Principal(subject=sub, issuer="https://idp.example", claims={"sub": sub}, token=TOKEN)
    tail = {GET_RUN: "", CANCEL_RUN: ":cancel", RUN_EVENTS: "/events"}[route]
    ex = exchange(route, principal, path=f"/v1/runs/{run_id}{tail}", decision="deny", reason=reason,
                  traceparent=traceparent)
    run_audit.record(ex, 404)  # type: ignore[arg-type]
    record = one_record(trail)
    assert record["run_id"] == run_id and record["reason"] == reason and record["decision"] == "deny"
    assert "statement_id" not in record and "node_type" not in record
    assert record["principal"]["sub"] == sub and len(record["token_id"]) == 16   # no jti: a hash, not the token
    ids = trace_ids(traceparent.decode("latin-1"))
    assert record.get("trace_id") == (ids[0] if ids is not None else None)


def test_an_auth_refusal_has_no_principal_and_the_client_a_trusted_proxy_named() -> None:
    run_audit, trail = audit_for()
    ex = exchange(CANCEL_RUN, None, path="/v1/runs/run_1:cancel", client="203.0.113.9")
    run_audit.record(ex, 401)  # type: ignore[arg-type]
    record = one_record(trail)
    assert record["decision"] == "deny" and record["reason"] == "missing_token" and record["status"] == 401
    assert record["run_id"] == "run_1" and record["client_address"] == "203.0.113.9"
    assert "principal" not in record and "token_id" not in record


def test_a_record_that_cannot_be_made_is_counted_and_never_raises() -> None:
    run_audit, trail = audit_for()
    principal = Principal(subject="alice", issuer="https://idp.example", token=TOKEN)
    ex = exchange(START_RUN, principal)
    ex.request = None   # a bug in what the record reads
    run_audit.record(ex, 200)  # type: ignore[arg-type]
    assert trail.lines == [] and trail.failures == 1


def test_records_that_share_what_repeats_each_keep_their_own_time_ids_and_caller() -> None:
    """What repeats is rendered once and kept: what differs per request must not be kept with it,
    and two callers alike in every claim (two tokens) are never mixed up."""
    run_audit, trail = audit_for()
    clock = trail.clock
    alice = Principal(subject="alice", issuer="https://idp.example", claims={"sub": "alice", "jti": "t1"}, token=TOKEN)
    twin = Principal(subject="alice", issuer="https://idp.example", claims={"sub": "alice", "jti": "t2"}, token=TOKEN)
    start = {"root_node_type_ref": {"node_type_id": "jarvis.composite.x", "version": "1"}, "input": {}}
    seen = []
    for principal, run_id, status in ((alice, "run_1", 200), (alice, "run_2", 200), (twin, "run_3", 200),
                                      (alice, None, 502)):
        ex = exchange(START_RUN, principal, run_id=run_id, decision="allow", start=start)
        ex.request.request_id = f"req-{run_id}"
        run_audit.record(ex, status)  # type: ignore[arg-type]
        clock.advance(0.25)
        seen.append(one_record(trail))
    assert [r["run_id"] for r in seen] == ["run_1", "run_2", "run_3", None]
    assert [r["request_id"] for r in seen] == ["req-run_1", "req-run_2", "req-run_3", "req-None"]
    assert [r["token_id"] for r in seen] == ["t1", "t1", "t2", "t1"]
    assert [r["status"] for r in seen] == [200, 200, 200, 502]
    assert len({r["time"] for r in seen}) == 4
    assert all(r["node_type"] == {"id": "jarvis.composite.x", "version": "1"} for r in seen)
