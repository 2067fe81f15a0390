"""Runs belong to their callers: the caller bound into a run start, and who may act on a run.

Two stages, each in `Gateway._stages` only when configured (a gateway with `runs.access: any`, no
policy and no binding runs neither, at no cost per request):

- `bind` (`runs.bind_identity`): the verified caller written into a run start's `run_context`
  (`arp/runcontext.py`); a conflicting client value is refused with 403.
- `authorize` (`runs.access` other than `any`, or `authorization.policy_file`): a get, cancel or
  events request is allowed for the run's owner (or tenant, or the admin scope) and by the policy;
  anything else is answered as a run that does not exist, with the same 404 an unknown run gets,
  so a run id's existence is not revealed. A run start is checked by the policy alone.

The coordinator stays the source of truth for owners: a bounded `run_id -> owner` cache is filled
from the run-start and GET answers this gateway relays, and on a miss the gateway asks the
coordinator (`GET /v1/runs/{id}`, the same pool and identity headers) before deciding, so any
number of replicas agree with no state shared between them. A GET is answered from that very
lookup: one request upstream, checked before a byte of it is relayed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..arp.answers import Answer, error_answer
from ..arp.policy import RunPolicy, load_policy
from ..arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, START_RUN, Route
from ..arp.runcontext import NOBODY, BindRefusal, RunBinder, RunOwner
from ..auth.principal import Principal, PrincipalKind
from ..observability.metrics import GatewayMetrics
from ..settings.config import GatewayConfig
from ..settings.models import RunAccess
from ..upstream import Upstream
from ..upstream.relay import Fetched
from ..util.boundedcache import BoundedCache

if TYPE_CHECKING:
    from .pipeline import Exchange

log = logging.getLogger("proxy.gateway.runaccess")

_ACTIONS: dict[Route, tuple[str, str]] = {   # route -> (metrics/audit action, policy action)
    START_RUN: ("start", "run:Start"),
    GET_RUN: ("get", "run:Get"),
    CANCEL_RUN: ("cancel", "run:Cancel"),
    RUN_EVENTS: ("events", "run:ReadEvents"),
}
_RUNS_PREFIX = len("/v1/runs/")
_BIND_STATUS = {"missing_tenant_claim": 403, "run_context_mismatch": 403}
_BIND_MESSAGES = {
    "missing_tenant_claim": "The token carries no tenant claim; this gateway starts runs only for a tenant",
    "run_context_mismatch": "run_context names another caller than the token; leave identity, actor and "
                            "tenant_id to the gateway",
    "duplicate_member": "The run start names run_context twice",
    "invalid_number": "run_context holds a number that JSON cannot carry",
}


def run_id_of(route: Route, path: str) -> str:
    """The raw (still percent-encoded) run id of a get, cancel or events path."""
    rest = path[_RUNS_PREFIX:]
    if route is CANCEL_RUN:
        return rest[: -len(":cancel")]
    if route is RUN_EVENTS:
        return rest.partition("/")[0]
    return rest


def _is_caller(principal: Principal | None) -> bool:
    """A verified token: the anonymous and dev principals name nobody that could own a run."""
    return principal is not None and principal.kind is PrincipalKind.TOKEN


class RunGuard:
    def __init__(self, cfg: GatewayConfig, upstream: Upstream, metrics: GatewayMetrics | None,
                 handed: Answer) -> None:
        runs = cfg.runs
        self._handed = handed  # the pipeline's "answered by the stage itself"
        self.upstream = upstream
        self.metrics = metrics
        self.binder = RunBinder(identity_claims=runs.identity_claims, tenant_claim=runs.tenant_claim,
                                overwrite=runs.on_conflict == "overwrite")
        self.binds = runs.bind_identity
        self.access = runs.access
        self.admin_scope = runs.admin_scope
        path = cfg.authorization.policy_file
        self.policy = RunPolicy(load_policy(path)) if path is not None else None
        if self.policy is not None:
            log.info("run policy loaded", extra={"event": "policy_loaded", "policy_file": path,
                                                 "policy_hash": self.policy.policy_hash})
        self.checks = self.access != RunAccess.ANY or self.policy is not None
        self.owners: BoundedCache[str, RunOwner] = BoundedCache(runs.owner_cache_size)

    # ------------------------------------------------------------------ binding

    def bind(self, ex: Exchange) -> Answer | None:
        if ex.route is not START_RUN or ex.body is None:
            return None
        outcome = ex.outcome
        principal = outcome.principal if outcome is not None else None
        if not _is_caller(principal):
            return None
        assert principal is not None and principal.issuer is not None
        request = ex.request
        bound = self.binder.bind(ex.body, principal.issuer, principal.subject, principal.claims,
                                 request.request_id, _header(request.headers, b"traceparent"))
        if bound.__class__ is not BindRefusal:
            ex.body = bound  # type: ignore[assignment]
            return None
        refusal: BindRefusal = bound
        ex.decision, ex.reason = "deny", refusal.reason
        self._denied("start", ex, refusal.reason)
        status = _BIND_STATUS.get(refusal.reason, 400)
        details = {"reason": refusal.reason}
        if refusal.member:
            details["member"] = refusal.member
        return error_answer(status, "forbidden" if status == 403 else "invalid_request",
                            _BIND_MESSAGES[refusal.reason], request_id=request.request_id, details=details)

    # ------------------------------------------------------------------ authorization

    def authorize(self, ex: Exchange) -> Any:
        """None to go on, an Answer (HANDED once answered here), or a coroutine when the owner must
        be looked up."""
        route = ex.route
        if route is START_RUN:
            return self._start(ex)
        if route not in _ACTIONS:
            return None  # a CORS preflight forwarded unauthenticated never reaches here; nothing else does
        ex.run_id = run_id = run_id_of(route, ex.request.path)
        if route is GET_RUN:
            return self._get(ex, run_id)
        owner = self.owners.get(run_id)
        if owner is None:
            return self._looked_up(ex, run_id)
        return self._decide(ex, owner)

    def peek_start(self, ex: Exchange) -> Callable[[int, bytes], None]:
        """What learns a started run's id and owner from the coordinator's answer."""
        def peek(status: int, body: bytes) -> None:
            if not 200 <= status < 300:
                return
            try:
                run = json.loads(body)
            except (ValueError, RecursionError):
                return
            run_id = run.get("run_id") if isinstance(run, dict) else None
            if isinstance(run_id, str) and run_id:
                ex.run_id = run_id
                self.owners.put(run_id, RunOwner.of(run))
        return peek

    def _start(self, ex: Exchange) -> Answer | None:
        if self.policy is None:
            return None
        try:
            doc = json.loads(ex.body or b"{}")
        except ValueError:  # the edge validated it; only a bound body could be new, and it is JSON
            doc = {}
        ref = doc.get("root_node_type_ref") if isinstance(doc, dict) else None
        ref = ref if isinstance(ref, dict) else {}
        node_type, version = ref.get("node_type_id"), ref.get("version")
        context = self._context(ex)
        context["node_type.id"] = node_type
        context["node_type.version"] = version
        allowed, statement = self.policy.decide("run:Start", f"node_type:{node_type}", context)
        ex.statement_id = statement
        if allowed:
            ex.decision, ex.reason = "allow", "policy_allowed"
            return None
        ex.decision, ex.reason = "deny", "policy_denied"
        self._denied("start", ex, "policy_denied")
        details: dict[str, Any] = {"reason": "policy_denied"}
        if statement:
            details["statement_id"] = statement
        return error_answer(403, "forbidden", "The authorization policy does not allow this run start",
                            request_id=ex.request.request_id, details=details)

    async def _get(self, ex: Exchange, run_id: str) -> Answer | None:
        fetched = await self.upstream.lookup(ex.request, GET_RUN, run_id.encode(), ex.extra)
        if fetched.__class__ is not Fetched:
            return fetched  # type: ignore[return-value]
        answer: Fetched = fetched
        if answer.status == 404:
            return self._not_found(ex, run_id)
        if answer.status != 200:
            return self._relay(ex, answer)
        owner = self._learn(run_id, answer)
        refusal = self._decide(ex, owner)
        if refusal is not None:
            return refusal
        return self._relay(ex, answer)

    async def _looked_up(self, ex: Exchange, run_id: str) -> Answer | None:
        fetched = await self.upstream.lookup(ex.request, ex.route, run_id.encode(), ex.extra)
        if fetched.__class__ is not Fetched:
            return fetched  # type: ignore[return-value]
        answer: Fetched = fetched
        if answer.status == 404:
            return self._not_found(ex, run_id)
        if answer.status != 200:
            # The coordinator could not say whose run it is: its answer (an error) is the client's.
            return self._relay(ex, answer)
        return self._decide(ex, self._learn(run_id, answer))

    def _learn(self, run_id: str, answer: Fetched) -> RunOwner:
        try:
            owner = RunOwner.of(json.loads(answer.body))
        except (ValueError, RecursionError):
            return NOBODY  # not a Run: nobody's, so only the admin scope reaches it
        self.owners.put(run_id, owner)
        return owner

    def _relay(self, ex: Exchange, answer: Fetched) -> Answer:
        self.upstream.relay_fetched(ex.request, ex.route, answer, ex.done)
        return self._handed

    def _decide(self, ex: Exchange, owner: RunOwner) -> Answer | None:
        outcome = ex.outcome
        principal = outcome.principal if outcome is not None else None
        route = ex.route
        action, policy_action = _ACTIONS[route]
        admin = self.admin_scope is not None and principal is not None and self.admin_scope in principal.scopes
        caller = _is_caller(principal)
        is_owner = tenant = None
        if caller:
            assert principal is not None
            is_owner = owner.subject is not None and principal.issuer == owner.issuer \
                and principal.subject == owner.subject
            tenant = self.binder.tenant_of(principal.claims)
        same_tenant = tenant is not None and owner.tenant == tenant
        if admin or self.access == RunAccess.ANY:
            allowed, reason = True, "admin" if admin else "any"
        elif self.access == RunAccess.OWNER:
            allowed, reason = bool(is_owner), "owner" if is_owner else "not_owner"
        else:
            allowed, reason = same_tenant, "tenant" if same_tenant else "other_tenant"
        if allowed and self.policy is not None:
            context = self._context(ex)
            context.update({"run.id": unquote(ex.run_id or ""), "run.owner": owner.subject,
                            "run.owner_issuer": owner.issuer, "run.tenant": owner.tenant,
                            "run.is_owner": "true" if is_owner else "false",
                            "run.same_tenant": "true" if same_tenant else "false"})
            allowed, ex.statement_id = self.policy.decide(policy_action, f"run:{context['run.id']}", context)
            reason = "policy_allowed" if allowed else "policy_denied"
        ex.decision, ex.reason = ("allow" if allowed else "deny"), reason
        if allowed:
            return None
        self._denied(action, ex, reason)
        return self._not_found(ex, ex.run_id or "")

    def _not_found(self, ex: Exchange, run_id: str) -> Answer:
        """The one answer for a run that does not exist and for one the caller may not see."""
        return error_answer(404, "run_not_found", f"Run '{unquote(run_id)}' not found",
                            request_id=ex.request.request_id, details={"run_id": unquote(run_id)})

    def _context(self, ex: Exchange) -> dict[str, Any]:
        """The policy's view of the caller; keys whose value is unknown are left out."""
        outcome = ex.outcome
        principal = outcome.principal if outcome is not None else None
        context: dict[str, Any] = {"request_id": ex.request.request_id}
        if principal is None:
            return context
        claims = principal.claims
        client = claims.get("azp", claims.get("client_id"))
        context.update({"principal": principal.subject, "issuer": principal.issuer,
                        "tenant": self.binder.tenant_of(claims), "scopes": sorted(principal.scopes),
                        "client_id": client if isinstance(client, str) else None})
        return context

    def _denied(self, action: str, ex: Exchange, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.run_access_denied[action] += 1
        log.info("run access denied", extra={"event": "run_access_denied", "action": action, "reason": reason,
                                             "request_id": ex.request.request_id})


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
