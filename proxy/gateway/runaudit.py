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
from typing import TYPE_CHECKING, Any

from ..arp.answers import Answer, error_answer
from ..arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, START_RUN, Route
from ..arp.runcontext import trace_ids
from ..auth.principal import Principal
from ..observability.audit import AuditTrail
from ..util.boundedcache import BoundedCache
from ..util.clock import rfc3339_millis
from .runaccess import CALLERS, RunGuard

if TYPE_CHECKING:
    from .pipeline import RunExchange

EVENTS: dict[Route, str] = {START_RUN: "run.start", GET_RUN: "run.get", CANCEL_RUN: "run.cancel",
                            RUN_EVENTS: "run.events"}
_RUN_ID_TAIL = {GET_RUN: 0, CANCEL_RUN: len(":cancel"), RUN_EVENTS: len("/events")}
_RUNS_PREFIX = len("/v1/runs/")
_POLICY_REASONS = frozenset({"policy_allowed", "policy_denied"})
NODE_TYPES = 1_000   # node types whose rendered record member is kept
REASONS = 256        # decision reasons kept rendered
# ASCII only: a lone surrogate in a claim or a path is written escaped, never fails the line's encoding.
_ENCODE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode
_STR = json.encoder.encode_basestring_ascii


class RunAudit:
    def __init__(self, trail: AuditTrail, guard: RunGuard) -> None:
        self.trail = trail
        self._guard = guard
        hashed = guard.policy.policy_hash if guard.policy is not None else None
        self._policy_hash = "null" if hashed is None else _STR(hashed)
        self._clock = trail.clock
        # id(principal) -> (principal, its rendered members), as runaccess keeps callers.
        self._who: BoundedCache[int, tuple[Principal, str]] = BoundedCache(CALLERS)
        # Looked up on every record, inline: no recency kept, so the oldest-made entry goes first.
        self._who_get = self._who.getter(touch=False)
        # (node_type_id, version) -> the rendered node_type member.
        self._nodes: BoundedCache[tuple[str, str | None], str] = BoundedCache(NODE_TYPES)
        self._nodes_get = self._nodes.getter(touch=False)
        # reason -> as JSON: the code's few dozen reasons, each escaped once.
        self._reasons: BoundedCache[str | None, str] = BoundedCache(REASONS)
        self._reasons.put(None, "null")
        self._reasons_get = self._reasons.getter(touch=False)

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
        """Renders the request's record as its JSON line and hands it to the trail; never raises.
        The line is made here, in one f-string: its members are the schema's by construction. Every
        value a token, a policy or the coordinator chose goes through a JSON string encoder that
        writes ASCII only; what the edge has already checked (the target's characters, a request
        id) or made (an IP address) has nothing to escape. No value can end its string, the line
        or the record early (tests/unit/gateway/test_runaudit.py generates hostile ones)."""
        route = ex.route
        event = EVENTS.get(route)
        outcome = ex.outcome
        if event is None or outcome is None:
            return  # not a run route, or refused before any auth decision (framing, target, limits)
        try:
            request = ex.request
            decision, reason = ex.decision, ex.reason
            if decision is None:
                refused = outcome.refusal is not None
                decision = "deny" if refused else "allow"
                reason = (outcome.reason or outcome.result.value) if refused else None
            run_id = ex.run_id
            if route is START_RUN:
                # From the coordinator's answer: anything at all.
                run = "null" if run_id is None else _STR(run_id)
            else:
                # From the target, whose characters the edge checked: none needs escaping in JSON.
                run = '"' + (run_id or request.path[_RUNS_PREFIX:len(request.path) - _RUN_ID_TAIL[route]]) + '"'
            principal = outcome.principal
            if principal is None:
                who = ""   # nobody was verified (a 401): no principal or token_id members
            else:
                found = self._who_get(id(principal))
                who = found[1] if found is not None and found[0] is principal else self._identity(principal)
            policy = ""
            if ex.statement_id is not None or reason in _POLICY_REASONS:
                statement = ex.statement_id
                policy = f',"statement_id":{"null" if statement is None else _STR(statement)},"policy_hash":' \
                         f'{self._policy_hash}'
            trace = ""
            traceparent = request.traceparent
            if traceparent is not None:
                ids = trace_ids(traceparent.decode("latin-1"))
                if ids is not None:
                    trace = f',"trace_id":"{ids[0]}"'   # 32 lowercase hex digits: nothing to escape
            node = ""
            if route is START_RUN:
                start = getattr(ex, "start", None)   # the body the client sent, as the edge decoded it
                ref = start.get("root_node_type_ref") if start.__class__ is dict else None
                if ref.__class__ is dict:
                    node = self._node_type(ref)
            # The request id (a checked client id or the gateway's) and the client address (a socket's
            # or a trusted proxy's, parsed as an IP address) need no escaping; a reason is a code's.
            line = (f'{{"time":"{rfc3339_millis(self._clock.time())}","event":"{event}","decision":"{decision}",'
                    f'"reason":{self._reasons_get(reason) or self._reason(reason)},"status":{int(status)},'
                    f'"request_id":"{request.request_id}","run_id":{run},'
                    f'"client_address":"{request.client or request.conn.peer}"{who}{policy}{trace}{node}}}\n')
            self.trail.record(line.encode(), event, decision)
        except Exception:
            self.trail.failed_record()

    def _reason(self, reason: str | None) -> str:
        rendered = "null" if reason is None else _STR(reason)
        self._reasons.put(reason, rendered)
        return rendered

    def _node_type(self, ref: dict[str, Any]) -> str:
        """The record's node_type member for a run start's node type reference; the same few node
        types are started over and over, so each is rendered once."""
        node_id, version = ref.get("node_type_id"), ref.get("version")
        if node_id.__class__ is not str:
            return ""
        if version.__class__ is not str:
            version = None
        key = (node_id, version)
        found = self._nodes_get(key)
        if found is None:
            found = f',"node_type":{_ENCODE({"id": node_id, "version": version})}'
            self._nodes.put(key, found)
        return found

    def _identity(self, principal: Principal) -> str:
        """The record's principal and token_id members, rendered once per principal (the token cache
        hands back the same Principal for each request with the same token)."""
        claims = principal.claims
        client = claims.get("azp", claims.get("client_id"))
        who = {"iss": principal.issuer, "sub": principal.subject,
               "tenant": self._guard.binder.tenant_of(claims),
               "client_id": client if isinstance(client, str) else None}
        jti = claims.get("jti")
        token_id = jti if isinstance(jti, str) and jti else \
            hashlib.sha256(principal.token.encode()).hexdigest()[:16] if principal.token else None
        rendered = f',"principal":{_ENCODE(who)},"token_id":{_ENCODE(token_id)}'
        self._who.put(id(principal), (principal, rendered))
        return rendered
