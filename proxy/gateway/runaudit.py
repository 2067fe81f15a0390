"""The audit record of each request on a run route: who did what to which run, and what it got.

One record per run-route request that reached an auth decision, written when its answer is done
(or the client left): an allowed or refused start, get, cancel or events request, auth refusals
(401/403) included. The facts come from the request's `Exchange` (`run_id`, `decision`, `reason`,
`statement_id`, set by gateway/runaccess.py) and its auth outcome, rendered here as the record's
JSON line (what one caller or one node type renders to is kept and reused); the trail
(observability/audit.py) queues and writes the lines. Never the token (its `jti`, else the first
16 hex digits of its SHA-256), never the run's `input`.

Built only when `audit.sink` is not off: the gateway then makes `AuditedExchange`s, and a gateway
without an audit trail pays nothing per request.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from ..arp.answers import Answer, error_answer
from ..arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, START_RUN, Route
from ..arp.runcontext import trace_ids
from ..arp.validation import NodeType
from ..auth.principal import Principal
from ..observability.audit import AuditTrail
from ..util.boundedcache import BoundedCache
from ..util.clock import rfc3339_millis
from .runaccess import RunGuard

if TYPE_CHECKING:
    from .pipeline import RunExchange

EVENTS: dict[Route, str] = {START_RUN: "run.start", GET_RUN: "run.get", CANCEL_RUN: "run.cancel",
                            RUN_EVENTS: "run.events"}
_RUN_ID_TAIL = {GET_RUN: 0, CANCEL_RUN: len(":cancel"), RUN_EVENTS: len("/events")}
_RUNS_PREFIX = len("/v1/runs/")
_POLICY_REASONS = frozenset({"policy_allowed", "policy_denied"})
RECORDS = 10_000     # combinations of what repeats in a record (caller, decision, node type...) kept rendered
# principal, event, decision, reason, statement_id, status, client address, (node type id, version)
Key = tuple[Principal | None, str, str, str | None, str | None, int, str, NodeType | None]
# ASCII only: a lone surrogate in a claim or a path is written escaped, never fails the line's encoding.
_ENCODE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode
_STR = json.encoder.encode_basestring_ascii


class RunAudit:
    def __init__(self, trail: AuditTrail, guard: RunGuard) -> None:
        self.trail = trail
        self._guard = guard
        hashed = guard.policy.policy_hash if guard.policy is not None else None
        self._policy_hash = "null" if hashed is None else _STR(hashed)
        self._time = trail.clock.time
        # What repeats from record to record -> its rendered members. The token cache hands back the
        # same Principal for each request with the same token, so a caller's records share entries.
        self._records: BoundedCache[Key, tuple[str, tuple[str, str]]] = BoundedCache(RECORDS)
        # Looked up on every record, inline: no recency kept, so the oldest-made entry goes first.
        self._kept = self._records.getter(touch=False)

    def gate(self, ex: RunExchange) -> Answer | None:
        """`audit.on_full: refuse`: no run start or cancel while its record could not be kept."""
        route = ex.route
        if (route is START_RUN or route is CANCEL_RUN) and not self.trail.accepting:
            ex.decision, ex.reason = "deny", "audit_unavailable"
            return error_answer(503, "audit_unavailable", "The audit trail cannot record this action now; "
                                "retry shortly", request_id=ex.request.request_id, retryable=True,
                                details={"reason": "audit_unavailable"})
        return None

    def record(self, ex: RunExchange, status: int, stamp: str | None = None) -> None:
        """Renders the request's record as its JSON line and hands it to the trail; never raises.
        `stamp`: the time the request's access-log line carries (RFC 3339, ms), when there is one.
        The line is made here, from a fixed template: its members are the schema's by construction.
        What repeats from request to request (the event, the decision and its reason, the status,
        the caller, the client address, the node type) is rendered once per combination and kept;
        per request only the time, the request id, the run id and a trace id are written in. Every
        value a token, a policy or the coordinator chose goes through a JSON string encoder that
        writes ASCII only; what the edge has already checked (the target's characters, a request
        id, a traceparent's hex) or made (an IP address) has nothing to escape. No value can end
        its string, the line or the record early (tests/unit/gateway/test_runaudit.py generates
        hostile ones)."""
        route = ex.route
        event = EVENTS.get(route)
        outcome = ex.outcome
        if event is None or outcome is None:
            return  # not a run route, or refused before any auth decision (framing, target, limits)
        try:
            request = ex.request
            decision = ex.decision
            if decision is None:
                refused = outcome.refusal is not None
                decision = "deny" if refused else "allow"
                reason = (outcome.reason or outcome.result.value) if refused else None
            else:
                reason = ex.reason
            run_id = ex.run_id
            if route is START_RUN:
                # From the coordinator's answer: anything at all.
                run = "null" if run_id is None else _STR(run_id)
            else:
                # From the target, whose characters the edge checked: none needs escaping in JSON.
                run = '"' + (run_id or request.path[_RUNS_PREFIX:len(request.path) - _RUN_ID_TAIL[route]]) + '"'
            key = (outcome.principal, event, decision, reason, ex.statement_id, status,
                   request.client or request.conn.peer, ex.node_type)
            kept = self._kept(key)
            if kept is None:
                kept = self._render(key)
            trace = ""
            traceparent = request.traceparent
            if traceparent is not None:
                ids = trace_ids(traceparent.decode("latin-1"))
                if ids is not None:
                    trace = f',"trace_id":"{ids[0]}"'   # 32 lowercase hex digits: nothing to escape
            self.trail.record(f'{{"time":"{stamp or rfc3339_millis(self._time())}","request_id":"{request.request_id}",'
                              f'"run_id":{run}{trace},{kept[0]}}}\n'.encode(), kept[1])
        except Exception:
            self.trail.failed_record()

    def _render(self, key: Key) -> tuple[str, tuple[str, str]]:
        """The members of a record that a combination of what repeats gives, and what the trail
        counts it under."""
        principal, event, decision, reason, statement, status, client, node = key
        members = f'"event":"{event}","decision":"{decision}","reason":{"null" if reason is None else _STR(reason)},' \
                  f'"status":{int(status)},"client_address":"{client}"'
        if principal is not None:   # None: nobody was verified (a 401): no principal or token_id members
            members += self._identity(principal)
        if statement is not None or reason in _POLICY_REASONS:
            members += f',"statement_id":{"null" if statement is None else _STR(statement)},"policy_hash":' \
                       f'{self._policy_hash}'
        if node is not None:
            members += f',"node_type":{_ENCODE({"id": node[0], "version": node[1]})}'
        kept = (members, (event, decision))
        self._records.put(key, kept)
        return kept

    def _identity(self, principal: Principal) -> str:
        """The record's principal and token_id members."""
        claims = principal.claims
        client = claims.get("azp", claims.get("client_id"))
        who = {"iss": principal.issuer, "sub": principal.subject,
               "tenant": self._guard.binder.tenant_of(claims),
               "client_id": client if isinstance(client, str) else None}
        jti = claims.get("jti")
        token_id = jti if isinstance(jti, str) and jti else \
            hashlib.sha256(principal.token.encode()).hexdigest()[:16] if principal.token else None
        return f',"principal":{_ENCODE(who)},"token_id":{_ENCODE(token_id)}'
