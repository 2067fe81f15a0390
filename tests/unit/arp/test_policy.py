"""arp-policy documents: what fails at start-up, and the shipped examples' decisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.arp.policy import PolicyFileError, RunPolicy, load_policy

POLICIES = Path(__file__).resolve().parents[3] / "config" / "policies"


def _write(tmp_path: Path, doc: object) -> str:
    path = tmp_path / "policy.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("doc, says", [
    ("{not json", "Invalid JSON"),
    ({"Version": "1"}, "Statement"),
    ({"Statement": [{"Effect": "Maybe", "Action": "run:Get", "Resource": "*"}]}, "Effect"),
    ({"Statement": [{"Effect": "Allow", "Action": "run:Get", "Resource": "*",
                     "Condition": {"NumericEquals": {"x": "1"}}}]}, "NumericEquals"),
    ({"Statement": [{"Effect": "Allow", "Action": "run:Get", "Resource": "*",
                     "Condition": {"StringEquals": ["x"]}}]}, "object"),
])
def test_a_policy_that_cannot_be_evaluated_fails_naming_its_file(tmp_path, doc, says):
    path = _write(tmp_path, doc)
    with pytest.raises(PolicyFileError) as info:
        load_policy(path)
    assert str(info.value).startswith(path) and says in str(info.value)


def test_a_missing_file_fails_naming_it(tmp_path):
    with pytest.raises(PolicyFileError, match="nope.json"):
        load_policy(str(tmp_path / "nope.json"))


def _owner_ctx(is_owner: bool, **more: object) -> dict[str, object]:
    return {"principal": "bob", "run.is_owner": "true" if is_owner else "false", "scopes": [], **more}


def test_owners_only_example():
    policy = RunPolicy(load_policy(str(POLICIES / "owners-only.json")))
    assert policy.decide("run:Start", "node_type:anything", {"principal": "bob"}) == (True, "AnyCallerStartsRuns")
    assert policy.decide("run:Cancel", "run:r1", _owner_ctx(True)) == (True, "OwnersActOnTheirRuns")
    assert policy.decide("run:Cancel", "run:r1", _owner_ctx(False)) == (False, None)


def test_tenant_members_and_admins_example():
    policy = RunPolicy(load_policy(str(POLICIES / "tenant-members-and-admins.json")))
    member = {"principal": "carol", "tenant": "A", "scopes": ["openid"]}
    assert policy.decide("run:Start", "node_type:jarvis.composite.planner.general", member)[0]
    assert not policy.decide("run:Start", "node_type:jarvis.core.uuid", member)[0]
    assert policy.decide("run:Get", "run:r1", {**member, "run.same_tenant": "true"})[0]
    assert not policy.decide("run:Get", "run:r1", {**member, "run.same_tenant": "false"})[0]
    admin = {"principal": "root", "scopes": ["openid", "arp:runs:admin"], "run.same_tenant": "false"}
    assert policy.decide("run:ReadEvents", "run:r1", admin) == (True, "AdminsEverywhere")
    assert policy.decide("run:Start", "node_type:jarvis.core.uuid", admin) == (True, "AdminsEverywhere")
