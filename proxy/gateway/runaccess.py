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
from ..arp.runcontext import NOBODY, BindRefusal, BoundCaller, RunBinder, RunOwner, read_run
from ..arp.validation import node_type_of
from ..auth.principal import Principal, PrincipalKind
from ..observability.metrics import GatewayMetrics
from ..settings.config import GatewayConfig
from ..settings.models import RunAccess
from ..upstream import Upstream
from ..upstream.relay import Fetched
from ..util.boundedcache import BoundedCache

if TYPE_CHECKING:
    from .pipeline import RunExchange

log = logging.getLogger("proxy.gateway.runaccess")
_TOKEN = PrincipalKind.TOKEN
CALLERS = 10_000  # principals whose bound run_context is remembered, as many as the token cache holds
_UNBOUND = object()  # what is bound for no principal, or the anonymous or dev one: nothing

_ACTIONS: dict[Route, tuple[str, str]] = {   # route -> (metrics/audit action, policy action)
    START_RUN: ("start", "run:Start"),
    GET_RUN: ("get", "run:Get"),
    CANCEL_RUN: ("cancel", "run:Cancel"),
    RUN_EVENTS: ("events", "run:ReadEvents"),
}
_RUNS_PREFIX = len("/v1/runs/")
_CANCEL = len(":cancel")
_BIND_STATUS = {"missing_tenant_claim": 403, "run_context_mismatch": 403}
_BIND_MESSAGES = {
    "missing_tenant_claim": "The token carries no tenant claim; this gateway starts runs only for a tenant",
    "run_context_mismatch": "run_context names another caller than the token; leave identity, actor and "
                            "tenant_id to the gateway",
    "duplicate_member": "The run start names run_context twice",
    "invalid_number": "run_context holds a number that JSON cannot carry",
}


def _is_caller(principal: Principal | None) -> bool:
    """A verified token: the anonymous and dev principals name nobody that could own a run."""
    return principal is not None and principal.kind is PrincipalKind.TOKEN


class RunGuard:
    def __init__(self, cfg: GatewayConfig, upstream: Upstream, metrics: GatewayMetrics | None, *,
                 handed: Answer, paused: Answer, proceed: Callable[[RunExchange, Answer | None], None]) -> None:
        runs = cfg.runs
        # The pipeline's driver: its sentinels, and how a stage that paused it continues it.
        self._handed, self._paused, self._proceed = handed, paused, proceed
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
        self._owner_only = self.access == RunAccess.OWNER and self.policy is None
        self.owners: BoundedCache[str, RunOwner] = BoundedCache(runs.owner_cache_size)
        # principal -> what is bound for it. A Principal is hashed by identity, and the token cache
        # hands back the same one for each request with the same token.
        self._callers: BoundedCache[Principal | None, BoundCaller | BindRefusal | object] = BoundedCache(CALLERS)
        # Looked up inline on every bound run start: no recency kept, the oldest-made goes first.
        self._callers_get = self._callers.getter(touch=False)

    # ------------------------------------------------------------------ binding

    def bind(self, ex: RunExchange) -> Answer | None:
        body = ex.body
        if ex.route is not START_RUN or body is None:
            return None
        principal = ex.outcome.principal  # type: ignore[union-attr]  # the authenticate stage set it
        caller = self._callers_get(principal) or self._caller(principal)
        request = ex.request
        if caller.__class__ is BoundCaller:
            traceparent = request.traceparent
            bound = self.binder.bind(body, caller, request.request_id,
                                     None if traceparent is None else traceparent.decode("latin-1"))
            if bound.__class__ is not BindRefusal:
                ex.body = bound  # type: ignore[assignment]
                ex.owner = caller.owner
                return None
        elif caller is _UNBOUND:
            return None  # no principal, or the anonymous or dev one: nobody to bind
        else:
            bound = caller  # type: ignore[assignment]
        refusal: BindRefusal = bound  # type: ignore[assignment]
        ex.decision, ex.reason = "deny", refusal.reason
        self._denied("start", ex, refusal.reason)
        status = _BIND_STATUS.get(refusal.reason, 400)
        details = {"reason": refusal.reason}
        if refusal.member:
            details["member"] = refusal.member
        return error_answer(status, "forbidden" if status == 403 else "invalid_request",
                            _BIND_MESSAGES[refusal.reason], request_id=request.request_id, details=details)

    def _caller(self, principal: Principal | None) -> BoundCaller | BindRefusal | object:
        """What is bound for this principal, made once (the callers look it up in `_callers` first):
        the token cache hands back the same Principal for each request with the same token, so it
        is found by identity. `_UNBOUND` for nobody verified."""
        caller = self.binder.caller(principal.issuer or "", principal.subject, principal.claims) \
            if principal is not None and principal.kind is _TOKEN else _UNBOUND
        self._callers.put(principal, caller)
        return caller

    # ------------------------------------------------------------------ authorization

    def authorize(self, ex: RunExchange) -> Answer | None:
        """None to go on, or an Answer: a refusal, or PAUSED while the run is looked up (the
        lookup's answer then continues the driver, or HANDED for a GET answered from it)."""
        route = ex.route
        if route is START_RUN:
            return self._start(ex) if self.policy is not None else None
        if not self.checks:
            return None  # here only to learn started runs' ids for the audit trail
        path = ex.request.path
        if route is GET_RUN:
            run_id = path[_RUNS_PREFIX:]
        else:
            if route is CANCEL_RUN:
                run_id = path[_RUNS_PREFIX:-_CANCEL]
            elif route is RUN_EVENTS:
                run_id = path[_RUNS_PREFIX:].partition("/")[0]
            else:
                return None  # only the four run routes get here (a bypassed CORS preflight never does)
            owner = self.owners.get(run_id)
            if owner is not None:
                ex.run_id = run_id
                return self._decide(ex, owner)
        ex.run_id = run_id
        self.upstream.lookup(ex.request, route, run_id.encode(), ex.extra, ex.done,
                             lambda answer: self._looked_up(ex, answer))
        return self._paused

    def peek(self, ex: RunExchange, status: int, body: bytes) -> None:
        """Learns a started run's id, and its owner, from the coordinator's answer to `ex`. A bound
        run's owner is the caller `bind` wrote into it; otherwise the answer's run_context says, and
        an answer without one teaches nothing (a coordinator need not echo run_context: the owner is
        then looked up when needed, never cached as nobody)."""
        if not 200 <= status < 300:
            return
        run = read_run(body)
        run_id = run.run_id if run is not None else None
        if run_id.__class__ is not str or not run_id:
            return
        ex.run_id = run_id
        bound = ex.owner
        if bound is not None:
            self.owners.put(run_id, bound)
        elif run.run_context is not None:  # type: ignore[union-attr]
            self.owners.put(run_id, RunOwner.of(run.run_context))  # type: ignore[union-attr]

    def _start(self, ex: RunExchange) -> Answer | None:
        if self.policy is None:
            return None
        node = ex.node_type   # kept by the edge when an audit trail is on
        if node is None:
            try:
                node = node_type_of(json.loads(ex.body or b"{}"))
            except ValueError:  # the edge validated it; only a bound body could be new, and it is JSON
                node = None
        node_type, version = node or (None, None)
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

    def _looked_up(self, ex: RunExchange, looked: Fetched | Answer) -> None:
        """The coordinator's answer about the run: decide, then answer from it (a GET) or go on to
        forward (cancel, events). A run it does not know gets the gateway's own 404, the same as a
        refusal; any other answer (an error) is relayed as it came, since it names no owner."""
        if looked.__class__ is not Fetched:
            self._proceed(ex, looked)  # type: ignore[arg-type]
            return
        answer: Fetched = looked
        run_id = ex.run_id or ""
        if answer.status == 404:
            self._proceed(ex, self._not_found(ex, run_id))
        elif answer.status != 200:
            self.upstream.relay_fetched(ex.request, ex.route, answer, ex.done)
        else:
            refusal = self._decide(ex, self._learn(run_id, answer))
            if refusal is None and ex.route is GET_RUN:
                self.upstream.relay_fetched(ex.request, ex.route, answer, ex.done)
            else:
                self._proceed(ex, refusal)

    def _learn(self, run_id: str, answer: Fetched) -> RunOwner:
        run = read_run(answer.body)
        if run is None:
            return NOBODY  # not a Run: nobody's, so only the admin scope reaches it
        owner = RunOwner.of(run.run_context)
        self.owners.put(run_id, owner)
        return owner

    def _decide(self, ex: RunExchange, owner: RunOwner) -> Answer | None:
        outcome = ex.outcome
        principal = outcome.principal if outcome is not None else None
        if self._owner_only and principal is not None and owner.subject == principal.subject \
                and owner.issuer == principal.issuer and principal.kind is _TOKEN and owner.subject is not None:
            ex.decision, ex.reason = "allow", "owner"  # the usual case, in one test
            return None
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

    def _not_found(self, ex: RunExchange, run_id: str) -> Answer:
        """The one answer for a run that does not exist and for one the caller may not see."""
        return error_answer(404, "run_not_found", f"Run '{unquote(run_id)}' not found",
                            request_id=ex.request.request_id, details={"run_id": unquote(run_id)})

    def _context(self, ex: RunExchange) -> dict[str, Any]:
        """The policy's view of the caller; a key whose value is unknown is None, which no
        condition matches."""
        outcome = ex.outcome
        principal = outcome.principal if outcome is not None else None
        context: dict[str, Any] = {"request_id": ex.request.request_id}
        # The connection's verified client certificate (listen.tls with client_auth): None unless asked for.
        certificate = ex.request.client_certificate
        if certificate is not None:
            context["client_cert.subject"] = certificate.subject
            context["client_cert.uris"] = list(certificate.uris)  # arp-policy: a condition matches any of them
            context["client_cert.uri"] = certificate.uris[0] if certificate.uris else None
        if principal is None:
            return context
        claims = principal.claims
        client = claims.get("azp", claims.get("client_id"))
        context.update({"principal": principal.subject, "issuer": principal.issuer,
                        "tenant": self.binder.tenant_of(claims), "scopes": sorted(principal.scopes),
                        "client_id": client if isinstance(client, str) else None})
        return context

    def _denied(self, action: str, ex: RunExchange, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.run_access_denied[action] += 1
        log.info("run access denied", extra={"event": "run_access_denied", "action": action, "reason": reason,
                                             "request_id": ex.request.request_id})

