"""The audit trail of run-route decisions, through a gateway in front of the real JARVIS Run Coordinator.

Every record is validated against the shipped schema; none may hold a token or a run's input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from proxy.observability.audit import schema
from tests.support.gateway import RUN_START
from tests.support.jarvis import JarvisStack

AUD = "arp-run-gateway"
SECRET_INPUT = "the-run-input-must-never-be-audited"
VALIDATOR = Draft202012Validator(schema(), format_checker=FormatChecker())


@pytest.fixture
async def jarvis(idp, tmp_path):
    async with JarvisStack(tmp_path, token_endpoint=idp.issuer + "/token") as stack:
        yield stack


def _auth(idp) -> dict[str, Any]:
    return {"mode": "required", "issuers": [{"issuer": idp.issuer, "audiences": [AUD]}]}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _records(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The file's records once there are `count` (the writer is off the request path)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or loop.time() > deadline:
            return [json.loads(line) for line in lines]
        await asyncio.sleep(0.05)


async def test_one_schema_valid_record_per_action_and_denial(gateway, jarvis, idp, http, tmp_path, capsys):
    audit = tmp_path / "audit.log"
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"Statement": [
        {"Sid": "Composites", "Effect": "Allow", "Action": "run:Start", "Resource": "node_type:jarvis.composite.*"},
        {"Sid": "NoCore", "Effect": "Deny", "Action": "run:Start", "Resource": "node_type:jarvis.core.*"},
        {"Sid": "Owners", "Effect": "Allow", "Action": ["run:Get", "run:Cancel", "run:ReadEvents"], "Resource": "run:*",
         "Condition": {"StringEquals": {"run.is_owner": "true"}}}]}))
    url = await gateway(jarvis.url, auth=_auth(idp), runs={"bind_identity": True, "access": "owner",
                                                           "tenant_claim": "tenant"},
                        authorization={"policy_file": str(policy)}, audit={"sink": "file", "path": str(audit)})
    alice = await idp.token({"sub": "alice", "aud": AUD, "tenant": "A", "azp": "cli", "jti": "alice-jti-1"})
    bob = await idp.token({"sub": "bob", "aud": AUD, "tenant": "B"})
    body = {**RUN_START, "input": {"goal": SECRET_INPUT}}
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with http.post(f"{url}/v1/runs", json=body, headers={**_bearer(alice), "traceparent": traceparent}) as r:
        assert r.status == 200
        run_id = (await r.json())["run_id"]
    core = {**body, "root_node_type_ref": {"node_type_id": "jarvis.core.uuid", "version": "0.3.3"}}
    async with http.post(f"{url}/v1/runs", json=core, headers=_bearer(alice)) as r:
        assert r.status == 403
    expected = [("run.start", "allow", 200), ("run.start", "deny", 403)]
    for who, status in ((bob, 404), (alice, 200)):
        for method, suffix, event in (("GET", "", "run.get"), ("GET", "/events", "run.events"),
                                      ("POST", ":cancel", "run.cancel")):
            async with http.request(method, f"{url}/v1/runs/{run_id}{suffix}", headers=_bearer(who)) as r:
                assert r.status == status
                await r.read()
            expected.append((event, "allow" if status == 200 else "deny", status))
    async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(alice[:-3] + "AAA")) as r:
        assert r.status == 401
    expected.append(("run.get", "deny", 401))
    async with http.get(f"{url}/v1/version", headers=_bearer(alice)) as r:   # not a run route: no record
        assert r.status == 200

    records = await _records(audit, len(expected))
    assert [(r["event"], r["decision"], r["status"]) for r in records] == expected
    for record in records:
        assert not list(VALIDATOR.iter_errors(record)), record
    text = audit.read_text()
    assert SECRET_INPUT not in text and alice not in text and bob not in text
    assert alice.split(".")[2] not in text   # not even the signature

    started, denied_start = records[0], records[1]
    assert started["run_id"] == run_id and started["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert started["principal"] == {"iss": idp.issuer, "sub": "alice", "tenant": "A", "client_id": "cli"}
    assert started["token_id"] == "alice-jti-1"
    assert started["node_type"] == {"id": "jarvis.composite.planner.general", "version": "0.3.3"}
    assert started["statement_id"] == "Composites" and len(started["policy_hash"]) == 64
    assert denied_start["reason"] == "policy_denied" and denied_start["statement_id"] == "NoCore"
    bobs = records[2:5]
    assert {r["reason"] for r in bobs} == {"not_owner"} and {r["run_id"] for r in bobs} == {run_id}
    assert bobs[0]["token_id"] == hashlib.sha256(bob.encode()).hexdigest()[:16]   # no jti: a hash
    assert records[-1]["reason"] and "principal" not in records[-1]                # the 401: nobody verified

    # Each record carries the time of its request's access-log line, to the millisecond.
    access: dict[str, str] = {}
    for _ in range(100):
        for line in capsys.readouterr().out.splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("type") == "access":
                access[entry["request_id"]] = entry["time"]
        if all(r["request_id"] in access for r in records):
            break
        await asyncio.sleep(0.05)
    assert [r["time"] for r in records] == [access[r["request_id"]] for r in records]


async def test_refuse_answers_starts_503_and_reads_go_on_while_the_file_cannot_be_written(gateway, jarvis, idp,
                                                                                       http):
    async with aiohttp.ClientSession() as direct, direct.post(f"{jarvis.url}/v1/runs", json=RUN_START) as r:
        run_id = (await r.json())["run_id"]   # started at the coordinator itself
    url = await gateway(jarvis.url, auth=_auth(idp),
                        audit={"sink": "file", "path": "/dev/full", "on_full": "refuse"})  # every write: ENOSPC
    token = await idp.token({"sub": "alice", "aud": AUD})
    async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(token)) as r:
        assert r.status == 200   # its record is the first that cannot be written
    for _ in range(100):         # bounded: the writer notices within its first batch
        async with http.post(f"{url}/v1/runs", json=RUN_START, headers=_bearer(token)) as r:
            answer = await r.json()
            if r.status == 503:
                break
        await asyncio.sleep(0.05)
    assert r.status == 503 and answer["error"]["code"] == "audit_unavailable" and answer["error"]["retryable"]
    async with http.post(f"{url}/v1/runs/{run_id}:cancel", headers=_bearer(token)) as r:
        assert r.status == 503
    async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(token)) as r:
        assert r.status == 200
    async with http.get(f"{url}/v1/runs/{run_id}/events", headers=_bearer(token)) as r:
        assert r.status == 200
        await r.read()


async def test_drop_keeps_answering_and_counts_what_it_lost(gateway, jarvis, idp, http):
    url = await gateway(jarvis.url, auth=_auth(idp), metrics={"enabled": True, "port": 0},
                        audit={"sink": "file", "path": "/dev/full"})
    token = await idp.token({"sub": "alice", "aud": AUD})
    for _ in range(3):
        async with http.post(f"{url}/v1/runs", json=RUN_START, headers=_bearer(token)) as r:
            assert r.status == 200
    dropped = 0.0
    for _ in range(100):
        async with http.get(f"{url}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("arp_gateway_audit_dropped_total"):
                    dropped = float(line.split()[-1])
        if dropped >= 3:
            break
        await asyncio.sleep(0.05)
    assert dropped >= 3


async def test_rotation_loses_no_record(gateway, jarvis, idp, http, tmp_path):
    audit = tmp_path / "audit.log"
    url = await gateway(jarvis.url, auth=_auth(idp), audit={"sink": "file", "path": str(audit)})
    token = await idp.token({"sub": "alice", "aud": AUD})
    async with http.post(f"{url}/v1/runs", json=RUN_START, headers=_bearer(token)) as r:
        run_id = (await r.json())["run_id"]

    async def gets(n: int) -> None:
        for _ in range(n):
            async with http.get(f"{url}/v1/runs/{run_id}", headers=_bearer(token)) as r:
                assert r.status == 200

    await gets(10)
    await _records(audit, 11)
    os.rename(audit, tmp_path / "audit.log.1")   # logrotate's rename; the gateway makes the new file
    await gets(10)
    rotated = [json.loads(line) for line in (tmp_path / "audit.log.1").read_text().splitlines()]
    fresh = await _records(audit, 21 - len(rotated))
    assert len(rotated) + len(fresh) == 21
    assert [r["event"] for r in rotated + fresh] == ["run.start"] + ["run.get"] * 20
