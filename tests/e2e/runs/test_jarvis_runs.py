"""Runs belong to their callers, proven against the real JARVIS Run Coordinator 0.3.8.

The coordinator, its Run Store and its Event Stream run as processes on loopback
(tests/support/jarvis.py); tokens come from the test IdP for alice and bob (tenants A and B),
carol (tenant A) and an admin. What the coordinator stored is read from its Run Store directly.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from arp_standard_client.run_gateway import RunGatewayClient
from arp_standard_model import (
    NodeTypeRef,
    RunGatewayCancelRunParams,
    RunGatewayCancelRunRequest,
    RunGatewayGetRunParams,
    RunGatewayGetRunRequest,
    RunGatewayStartRunRequest,
    RunStartRequest,
)

from tests.support.gateway import RUN_START
from tests.support.jarvis import JarvisStack

AUD = "arp-run-gateway"
ADMIN_SCOPE = "arp:runs:admin"
POLICIES = Path(__file__).resolve().parents[3] / "config" / "policies"
PEOPLE = {"alice": "A", "bob": "B", "carol": "A", "root": "A"}


@pytest.fixture
async def jarvis(idp, tmp_path):
    async with JarvisStack(tmp_path, token_endpoint=idp.issuer + "/token") as stack:
        yield stack


@pytest.fixture
async def tokens(idp) -> dict[str, str]:
    made = {}
    for name, tenant in PEOPLE.items():
        claims: dict[str, Any] = {"sub": name, "aud": AUD, "tenant": tenant, "email": f"{name}@example.test",
                                  "azp": "cli"}
        if name == "root":
            claims["scope"] = ADMIN_SCOPE
        made[name] = await idp.token(claims)
    return made


def _auth(idp) -> dict[str, Any]:
    return {"mode": "required", "issuers": [{"issuer": idp.issuer, "audiences": [AUD]}]}


def _bearer(token: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


def _set(value: Any) -> Any:
    """A stored document without the null members the coordinator's models add."""
    if isinstance(value, dict):
        return {k: _set(v) for k, v in value.items() if v is not None}
    return value


async def _start(http: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any] | None = None,
                 **headers: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v1/runs", json=body or RUN_START, headers=_bearer(token, **headers)) as r:
        return r.status, json.loads(await r.read())


async def _acts(http: aiohttp.ClientSession, url: str, token: str, run_id: str) -> dict[str, int]:
    """get, events, then cancel (last: it ends the run) as this caller: the statuses."""
    seen = {}
    async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(token)) as r:
        seen["get"] = r.status
    async with http.get(f"{url}/v1/runs/{run_id}/events", headers=_bearer(token)) as r:
        seen["events"] = r.status
        await r.read()
    async with http.post(f"{url}/v1/runs/{run_id}:cancel", headers=_bearer(token)) as r:
        seen["cancel"] = r.status
    return seen


async def test_owner_mode_hides_a_run_from_everyone_but_its_owner_and_the_admin(gateway, jarvis, idp, tokens,
                                                                                http):
    url = await gateway(jarvis.url, auth=_auth(idp),
                        runs={"bind_identity": True, "access": "owner", "admin_scope": ADMIN_SCOPE,
                              "tenant_claim": "tenant"})
    status, run = await _start(http, url, tokens["alice"])
    assert status == 200, run
    run_id = run["run_id"]
    events_before = len(await jarvis.stored_events(run_id))

    # bob: every action is the 404 of an unknown run, and nothing reached the coordinator.
    assert await _acts(http, url, tokens["bob"], run_id) == {"get": 404, "events": 404, "cancel": 404}
    stored = await jarvis.stored_run(run_id)
    assert stored is not None and stored["state"] == "running"          # no cancel arrived
    assert len(await jarvis.stored_events(run_id)) == events_before     # no run_completed event either

    # A fresh gateway (another replica, empty owner cache) decides the same, from the coordinator.
    replica = await gateway(jarvis.url, auth=_auth(idp),
                            runs={"bind_identity": True, "access": "owner", "admin_scope": ADMIN_SCOPE,
                                  "tenant_claim": "tenant"})
    async with http.post(f"{replica}/v1/runs/{run_id}:cancel", headers=_bearer(tokens["bob"])) as r:
        assert r.status == 404
    assert (await jarvis.stored_run(run_id))["state"] == "running"

    # The admin scope reaches it; the owner too.
    async with http.get(f"{replica}/v1/runs/{run_id}", headers=_bearer(tokens["root"])) as r:
        assert r.status == 200 and (await r.json())["run_id"] == run_id
    assert await _acts(http, url, tokens["alice"], run_id) == {"get": 200, "events": 200, "cancel": 200}
    assert (await jarvis.stored_run(run_id))["state"] == "canceled"


async def test_a_refusal_is_byte_for_byte_the_answer_for_an_unknown_run(gateway, jarvis, idp, tokens, http):
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True, "access": "owner"})
    _, run = await _start(http, url, tokens["alice"])

    async def shape(run_id: str) -> tuple[int, bytes, str | None]:
        async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(tokens["bob"], **{"X-Request-ID": "r1"})) as r:
            body = (await r.read()).replace(run_id.encode(), b"RUN")
            return r.status, body, r.headers.get("Content-Type")

    taken = run["run_id"]
    unknown = "run_" + "0" * (len(taken) - 4)
    assert await shape(taken) == await shape(unknown)
    status, body, _ = await shape(unknown)
    assert status == 404 and json.loads(body)["error"]["code"] == "run_not_found"


async def test_tenant_mode_lets_the_tenant_in_and_keeps_the_other_tenant_out(gateway, jarvis, idp, tokens, http):
    url = await gateway(jarvis.url, auth=_auth(idp),
                        runs={"bind_identity": True, "access": "tenant", "tenant_claim": "tenant"})
    _, run = await _start(http, url, tokens["alice"])
    run_id = run["run_id"]
    assert await _acts(http, url, tokens["bob"], run_id) == {"get": 404, "events": 404, "cancel": 404}
    assert (await jarvis.stored_run(run_id))["state"] == "running"
    assert await _acts(http, url, tokens["carol"], run_id) == {"get": 200, "events": 200, "cancel": 200}


async def test_access_any_behaves_as_before(gateway, jarvis, idp, tokens, http):
    url = await gateway(jarvis.url, auth=_auth(idp))
    _, run = await _start(http, url, tokens["alice"])
    assert await _acts(http, url, tokens["bob"], run["run_id"]) == {"get": 200, "events": 200, "cancel": 200}


async def test_the_coordinator_stores_the_bound_caller(gateway, jarvis, idp, tokens, http):
    url = await gateway(jarvis.url, auth=_auth(idp),
                        runs={"bind_identity": True, "tenant_claim": "tenant", "identity_claims": ["email"]})
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    body = {**RUN_START, "metadata": {"labels": {"team": "x"}},
            "run_context": {"policy": {"profile": "strict"}, "budgets": {"max_steps": 3}}}
    status, run = await _start(http, url, tokens["alice"], body, **{"X-Request-ID": "req-alice-1",
                                                                   "traceparent": traceparent})
    assert status == 200, run
    stored = await jarvis.stored_run(run["run_id"])
    assert stored is not None
    context = _set(stored["run_context"])
    assert context["identity"] == {"iss": idp.issuer, "sub": "alice", "email": "alice@example.test"}
    assert context["actor"] == {"type": "principal", "id": "alice"}
    assert context["tenant_id"] == "A"
    assert context["trace"] == {"request_id": "req-alice-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                                "span_id": "00f067aa0ba902b7"}
    assert context["policy"] == {"profile": "strict"} and context["budgets"] == {"max_steps": 3}


@pytest.mark.parametrize("member, value", [
    ("identity", {"iss": "https://evil.example", "sub": "alice"}),
    ("actor", {"type": "principal", "id": "alice"}),
    ("tenant_id", "A"),
])
async def test_a_spoofed_member_is_refused_or_overwritten(gateway, jarvis, idp, tokens, http, member, value):
    runs = {"bind_identity": True, "tenant_claim": "tenant"}
    url = await gateway(jarvis.url, auth=_auth(idp), runs=runs)
    # A run id of the client's choosing: the coordinator keeps it (seen below), so a refused start
    # that had reached it would be in its Run Store under that id.
    refused_id, kept_id = f"run_spoofed_{member}", f"run_overwritten_{member}"
    spoof = {**RUN_START, "run_context": {member: value}}
    status, answer = await _start(http, url, tokens["bob"], {**spoof, "run_id": refused_id})
    assert status == 403
    assert answer["error"]["code"] == "forbidden"
    assert answer["error"]["details"]["reason"] == "run_context_mismatch"
    assert await jarvis.stored_run(refused_id) is None   # never forwarded

    url = await gateway(jarvis.url, auth=_auth(idp), runs={**runs, "on_conflict": "overwrite"})
    status, run = await _start(http, url, tokens["bob"], {**spoof, "run_id": kept_id})
    assert status == 200, run
    assert run["run_id"] == kept_id
    context = _set((await jarvis.stored_run(run["run_id"]))["run_context"])
    assert context["identity"] == {"iss": idp.issuer, "sub": "bob"}
    assert context["actor"] == {"type": "principal", "id": "bob"} and context["tenant_id"] == "B"


async def test_a_token_without_the_tenant_claim_starts_nothing(gateway, jarvis, idp, http):
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True, "tenant_claim": "tenant"})
    token = await idp.token({"sub": "dave", "aud": AUD})
    status, answer = await _start(http, url, token)
    assert status == 403 and answer["error"]["details"]["reason"] == "missing_tenant_claim"


# --------------------------------------------------------------------------- arp-policy


async def test_a_policy_on_node_types_refuses_other_starts_with_its_statement(gateway, jarvis, idp, tokens, http,
                                                                           tmp_path):
    policy = tmp_path / "composites.json"
    policy.write_text(json.dumps({"Version": "2025-01-01", "Statement": [
        {"Sid": "CompositesOnly", "Effect": "Allow", "Action": "run:Start", "Resource": "node_type:jarvis.composite.*"},
        {"Sid": "NoCoreNodes", "Effect": "Deny", "Action": "run:Start", "Resource": "node_type:jarvis.core.*"},
        {"Sid": "Reads", "Effect": "Allow", "Action": ["run:Get", "run:Cancel", "run:ReadEvents"], "Resource": "run:*"},
    ]}))
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True},
                        authorization={"policy_file": str(policy)}, metrics={"enabled": True, "port": 0})
    status, run = await _start(http, url, tokens["alice"])
    assert status == 200, run
    core = {**RUN_START, "root_node_type_ref": {"node_type_id": "jarvis.core.uuid", "version": "0.3.3"},
            "run_id": "run_denied_by_policy"}
    status, answer = await _start(http, url, tokens["alice"], core)
    assert status == 403
    assert answer["error"]["code"] == "forbidden"
    assert answer["error"]["details"]["reason"] == "policy_denied"
    assert answer["error"]["details"]["statement_id"] == "NoCoreNodes"
    assert await jarvis.stored_run("run_denied_by_policy") is None   # never forwarded
    other = {**RUN_START, "root_node_type_ref": {"node_type_id": "acme.tool", "version": "1"}}
    status, answer = await _start(http, url, tokens["alice"], other)
    assert status == 403 and "statement_id" not in answer["error"]["details"]   # the default deny
    async with http.get(f"{url}/metrics") as r:
        assert 'arp_gateway_run_access_denied_total{action="start"} 2.0' in await r.text()


async def test_the_owners_only_example_policy_alone_hides_other_callers_runs(gateway, jarvis, idp, tokens, http):
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True},
                        authorization={"policy_file": str(POLICIES / "owners-only.json")})
    _, run = await _start(http, url, tokens["alice"])
    assert await _acts(http, url, tokens["bob"], run["run_id"]) == {"get": 404, "events": 404, "cancel": 404}
    assert (await jarvis.stored_run(run["run_id"]))["state"] == "running"
    assert await _acts(http, url, tokens["alice"], run["run_id"]) == {"get": 200, "events": 200, "cancel": 200}


async def test_the_tenant_example_policy_admits_members_and_admins(gateway, jarvis, idp, tokens, http):
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True, "tenant_claim": "tenant"},
                        authorization={"policy_file": str(POLICIES / "tenant-members-and-admins.json")})
    _, run = await _start(http, url, tokens["alice"])
    run_id = run["run_id"]
    async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(tokens["bob"])) as r:
        assert r.status == 404
    async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(tokens["carol"])) as r:
        assert r.status == 200
    admin = await idp.token({"sub": "ops", "aud": AUD, "tenant": "Z", "scope": "arp:runs:admin"})
    async with http.post(f"{url}/v1/runs/{run_id}:cancel", headers=_bearer(admin)) as r:
        assert r.status == 200


# --------------------------------------------------------------------------- real clients, as owners


def _python_client_round_trip(url: str, token: str) -> tuple[str, str, str]:
    client = RunGatewayClient(url, bearer_token=token)
    body = RunStartRequest(root_node_type_ref=NodeTypeRef(node_type_id="jarvis.composite.planner.general",
                                                          version="0.3.3"), input={"goal": "x"})
    started = client.start_run(RunGatewayStartRunRequest(body=body))
    fetched = client.get_run(RunGatewayGetRunRequest(params=RunGatewayGetRunParams(run_id=started.run_id)))
    canceled = client.cancel_run(RunGatewayCancelRunRequest(params=RunGatewayCancelRunParams(run_id=started.run_id)))
    return started.run_id, fetched.run_id, canceled.state.value


async def test_the_arp_python_client_works_as_an_owner(gateway, jarvis, idp, tokens):
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True, "access": "owner"})
    started, fetched, state = await asyncio.to_thread(_python_client_round_trip, url, tokens["alice"])
    assert started == fetched and state == "canceled"


# The arp-jarvis CLI gets its token by device login into a keyring; here it is handed the test IdP's
# token instead, and everything else (its requests, their parsing) is the CLI's own.
_CLI = """
import sys
import arp_jarvis.cli as cli
cli._maybe_token = lambda config, output, audience=None: (sys.argv[1], "test")
sys.exit(cli.main(sys.argv[2:]))
"""


async def _cli(url: str, token: str, *args: str) -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLI, token, "--json", "--gateway-url", url, "runs", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        # An empty stack root: the CLI reads its compose files from there, and needs none here.
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "ARP_JARVIS_STACK_ROOT": "/nonexistent"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    try:
        return proc.returncode or 0, json.loads(text)
    except ValueError:
        return proc.returncode or 0, text + err.decode()


async def test_the_arp_jarvis_cli_works_as_an_owner(gateway, jarvis, idp, tokens):
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True, "access": "owner"})
    rc, started = await _cli(url, tokens["alice"], "start", "--goal", "hello", "--node-version", "0.3.3")
    assert rc == 0, started
    run_id = started["run_id"] if "run_id" in started else started["run"]["run_id"]
    rc, got = await _cli(url, tokens["alice"], "get", run_id)
    assert rc == 0 and json.dumps(got).count(run_id), got
    rc, other = await _cli(url, tokens["bob"], "get", run_id)
    assert rc != 0 and "run_not_found" in json.dumps(other), other
    rc, canceled = await _cli(url, tokens["alice"], "cancel", run_id)
    assert rc == 0 and "canceled" in json.dumps(canceled), canceled
