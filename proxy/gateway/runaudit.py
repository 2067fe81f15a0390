"""The audit record of each request on a run route: who did what to which run, and what it got.

One record per run-route request that reached an auth decision, written when its answer is done
(or the client left): an allowed or refused start, get, cancel or events request, auth refusals
(401/403) included. The facts come from the request's `Exchange` (`run_id`, `decision`, `reason`,
`statement_id`, set by gateway/runaccess.py) and its auth outcome; the trail
(observability/audit.py) stamps, queues and writes them. Never the token (its `jti`, else the
first 16 hex digits of its SHA-256), never the run's `input`.

Built only when `audit.sink` is not off: the gateway then makes `AuditedExchange`s, and a gateway
without an audit trail pays nothing per request.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from ..arp.answers import Answer, error_answer
from ..arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, START_RUN, Route
from ..arp.runcontext import trace_ids
from ..auth.principal import Principal
from ..observability.audit import AuditTrail
from ..util.boundedcache import BoundedCache
from .runaccess import CALLERS, RunGuard

if TYPE_CHECKING:
    from .pipeline import RunExchange

EVENTS: dict[Route, str] = {START_RUN: "run.start", GET_RUN: "run.get", CANCEL_RUN: "run.cancel",
                            RUN_EVENTS: "run.events"}
_RUN_ID_TAIL = {GET_RUN: 0, CANCEL_RUN: len(":cancel"), RUN_EVENTS: len("/events")}
_RUNS_PREFIX = len("/v1/runs/")
_POLICY_REASONS = frozenset({"policy_allowed", "policy_denied"})


class RunAudit:
    def __init__(self, trail: AuditTrail, guard: RunGuard) -> None:
        self.trail = trail
        self._guard = guard
        self._policy_hash = guard.policy.policy_hash if guard.policy is not None else None
        # id(principal) -> (principal, its record member, its token id), as runaccess keeps callers.
        self._who: BoundedCache[int, tuple[Principal, dict[str, Any], str | None]] = BoundedCache(CALLERS)
        # Looked up on every record, inline: no recency kept, so the oldest-made entry goes first.
        self._who_get = self._who.getter(touch=False)

    def gate(self, ex: RunExchange) -> Answer | None:
        """`audit.on_full: refuse`: no run start or cancel while its record could not be kept."""
        route = ex.route
        if (route is START_RUN or route is CANCEL_RUN) and not self.trail.accepting:
            ex.decision, ex.reason = "deny", "audit_unavailable"
            return error_answer(503, "audit_unavailable", "The audit trail cannot record this action now; "
                                "retry shortly", request_id=ex.request.request_id, retryable=True,
                                details={"reason": "audit_unavailable"})
        return None

    def record(self, ex: RunExchange, status: int) -> None:
        route = ex.route
        event = EVENTS.get(route)
        outcome = ex.outcome
        if event is None or outcome is None:
            return  # not a run route, or refused before any auth decision (framing, target, limits)
        request = ex.request
        decision, reason = ex.decision, ex.reason
        if decision is None:
            refused = outcome.refusal is not None
            decision = "deny" if refused else "allow"
            reason = (outcome.reason or outcome.result.value) if refused else None
        run_id = ex.run_id
        if run_id is None and route is not START_RUN:
            run_id = request.path[_RUNS_PREFIX:len(request.path) - _RUN_ID_TAIL[route]]
        principal = outcome.principal
        if principal is None:
            who = token_id = None
        else:
            found = self._who_get(id(principal))
            if found is not None and found[0] is principal:
                _, who, token_id = found
            else:
                who, token_id = self._identity(principal)
        fields: dict[str, Any] = {
            "time": None,   # first, stamped by the trail
            "event": event, "decision": decision, "reason": reason, "status": status,
            "request_id": request.request_id, "run_id": run_id,
            "client_address": request.client or request.conn.peer, "principal": who, "token_id": token_id,
        }
        if who is None:
            del fields["principal"], fields["token_id"]   # nobody was verified (a 401): no such members
        if ex.statement_id is not None or reason in _POLICY_REASONS:
            fields["statement_id"] = ex.statement_id
            fields["policy_hash"] = self._policy_hash
        for name, value in request.headers:
            if len(name) == 11 and name.lower() == b"traceparent":
                ids = trace_ids(value.decode("latin-1"))
                if ids is not None:
                    fields["trace_id"] = ids[0]
                break
        if route is START_RUN:
            start = getattr(ex, "start", None)   # the body the client sent, as the edge decoded it
            ref = start.get("root_node_type_ref") if start.__class__ is dict else None
            if ref.__class__ is dict:
                node_id, version = ref.get("node_type_id"), ref.get("version")
                if node_id.__class__ is str:
                    fields["node_type"] = {"id": node_id, "version": version if version.__class__ is str else None}
        self.trail.record(fields, typed=True)

    def _identity(self, principal: Principal) -> tuple[dict[str, Any], str | None]:
        """The record's principal member and token id, made once per principal (the token cache
        hands back the same Principal for each request with the same token)."""
        key = id(principal)
        claims = principal.claims
        client = claims.get("azp", claims.get("client_id"))
        who = {"iss": principal.issuer, "sub": principal.subject,
               "tenant": self._guard.binder.tenant_of(claims),
               "client_id": client if isinstance(client, str) else None}
        jti = claims.get("jti")
        token_id = jti if isinstance(jti, str) and jti else \
            hashlib.sha256(principal.token.encode()).hexdigest()[:16] if principal.token else None
        self._who.put(key, (principal, who, token_id))
        return who, token_id
