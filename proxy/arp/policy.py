"""Per-run rules in an arp-policy document: the ARP project's own IAM-like evaluator.

The ARP security profiles name `arp-policy` (PyPI) as the helper for authorization at the Run
Gateway, so the gateway evaluates its documents rather than a grammar of its own: `Effect`,
`Action`, `Resource`, `Condition` with `StringEquals`/`StringLike`, an explicit Deny winning,
default deny. The actions are `run:Start`, `run:Get`, `run:Cancel` and `run:ReadEvents`; the
resource is `node_type:<node_type_id>` for a start and `run:<run_id>` for the others.

arp-policy parses a document lazily: an unknown condition operator, or a condition that is not
an object, only fails when a request reaches it. `load_policy` checks those at start-up too, so a
policy that cannot be evaluated fails the start naming its file, never a request.

    policy = load_policy("config/policies/owners-only.json")       # PolicyFileError naming the file
    allowed, statement_id = RunPolicy(policy).decide("run:Get", "run:run_1", context)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from arp_policy import Enforcer, Policy, PolicyError

log = logging.getLogger("proxy.arp.policy")

ACTIONS = ("run:Start", "run:Get", "run:Cancel", "run:ReadEvents")
_OPERATORS = frozenset({"StringEquals", "StringLike"})


class PolicyFileError(ValueError):
    """A policy file that cannot be read, parsed or evaluated; the message names the file."""


def load_policy(path: str) -> Policy:
    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        raise PolicyFileError(f"{path}: {exc}") from None
    for index, statement in enumerate(policy.statements):
        problem = _condition_problem(statement.condition)
        if problem:
            raise PolicyFileError(f"{path}: Statement[{index}].Condition {problem}")
    return policy


def _condition_problem(condition: dict[str, Any] | None) -> str:
    if condition is None:
        return ""
    for operator, keys in condition.items():
        if operator not in _OPERATORS:
            return f"uses {operator!r}; only StringEquals and StringLike are evaluated"
        if not isinstance(keys, Mapping):
            return f"{operator} must be an object of context keys"
        for key, expected in keys.items():
            values = expected if isinstance(expected, list) else [expected]
            if any(isinstance(v, dict) for v in values):
                return f"{operator}.{key} must be a string or a list of strings"
    return ""


class RunPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy_hash = policy.policy_hash
        self._enforcer = Enforcer(policy)

    def decide(self, action: str, resource: str, context: Mapping[str, Any]) -> tuple[bool, str | None]:
        """Whether `action` on `resource` is allowed, and the id of the statement that decided (None
        for the default deny). An evaluation error denies: the context is the gateway's own, so it
        would be a bug, and a bug must not open a run."""
        try:
            decision = self._enforcer.authorize(action, resource, context)
        except PolicyError as exc:
            log.error("policy evaluation failed", extra={"event": "policy_error", "error": str(exc),
                                                         "action": action})
            return False, None
        return decision.allowed, decision.matched_statement_id
