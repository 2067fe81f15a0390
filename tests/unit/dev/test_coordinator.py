"""Tests for the dev-only in-memory Run Coordinator (proxy/dev/coordinator.py).

Every response body is validated against the ARP v1 JSON Schemas in
/work/shared/arp-spec-v1 (the repo's sibling ``shared`` directory).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy.dev.coordinator import create_app, start
from tests.support.gateway import SPEC

SCHEMAS = SPEC / "schemas"

# jsonschema only checks "date-time" when rfc3339-validator is installed; don't
# rely on that. The gateway contract here also wants UTC with a literal "Z".
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
_FORMATS = FormatChecker(formats=())
_FORMATS.checks("date-time")(lambda v: not isinstance(v, str) or bool(_RFC3339_UTC.match(v)))


def _retrieve(uri: str) -> Resource:
    # Spec schemas have no $id and use relative $refs, so resolve by file URI.
    path = Path(uri.removeprefix("file://"))
    return Resource.from_contents(json.loads(path.read_text()), default_specification=DRAFT202012)


_REGISTRY: Registry = Registry(retrieve=_retrieve)  # type: ignore[call-arg]


def validate(name: str, instance: Any) -> None:
    uri = (SCHEMAS / f"{name}.schema.json").as_uri()
    Draft202012Validator({"$ref": uri}, registry=_REGISTRY, format_checker=_FORMATS).validate(instance)


START_BODY = {
    "root_node_type_ref": {"node_type_id": "demo.echo", "version": "1.0.0"},
    "input": {"text": "hi"},
}
EXPECTED_TYPES = ["run_started", "node_run_assigned", "atomic_executed", "node_evaluated",
                  "run_completed"]


@pytest.fixture
def make_client(aiohttp_client: Any) -> Any:
    async def make(step_delay_s: float = 0.05) -> Any:
        return await aiohttp_client(create_app(step_delay_s=step_delay_s))
    return make


async def _start_run(client: Any, **extra: Any) -> dict[str, Any]:
    resp = await client.post("/v1/runs", json={**START_BODY, **extra})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    validate("core/run", body)
    return body


async def _read_events(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> list[tuple[float, dict]]:
    """Read NDJSON lines until EOF, recording each line's arrival time."""
    out: list[tuple[float, dict]] = []

    async def read() -> None:
        while line := await resp.content.readline():
            out.append((time.monotonic(), json.loads(line)))

    await asyncio.wait_for(read(), timeout)
    return out


async def _assert_error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    validate("common/error", body)
    assert body["error"]["code"] == code
    return body


def _check_events(events: list[dict], run_id: str) -> None:
    for event in events:
        validate("core/run_event", event)
        assert event["run_id"] == run_id
    assert [e["seq"] for e in events] == list(range(len(events)))


@pytest.mark.asyncio
async def test_start_assigns_ids_and_is_schema_valid(make_client: Any) -> None:
    client = await make_client()
    run = await _start_run(client)
    assert run["run_id"] and run["root_node_run_id"]
    assert run["state"] == "queued"
    assert run["started_at"].endswith("Z")
    assert "ended_at" not in run and "run_context" not in run
    assert None not in run.values()

    other = await _start_run(client)
    assert other["run_id"] != run["run_id"]
    assert other["root_node_run_id"] != run["root_node_run_id"]

    got = await client.get(f"/v1/runs/{run['run_id']}")
    assert got.status == 200
    validate("core/run", await got.json())


@pytest.mark.asyncio
async def test_given_run_id_and_run_context_honoured(make_client: Any) -> None:
    client = await make_client()
    ctx = {"tenant_id": "t1", "trace": {"trace_id": "abc"}}
    run = await _start_run(client, run_id="my:run-1", run_context=ctx)
    assert run["run_id"] == "my:run-1"
    assert run["run_context"] == ctx
    # A ':' in the id must not confuse the ':cancel' route.
    resp = await client.post("/v1/runs/my:run-1:cancel")
    assert resp.status == 200
    assert (await resp.json())["run_id"] == "my:run-1"


@pytest.mark.asyncio
async def test_duplicate_run_id_conflicts(make_client: Any) -> None:
    client = await make_client()
    await _start_run(client, run_id="dup")
    resp = await client.post("/v1/runs", json={**START_BODY, "run_id": "dup"})
    body = await _assert_error(resp, 409, "run_exists")
    assert body["error"]["details"] == {"run_id": "dup"}


@pytest.mark.asyncio
@pytest.mark.parametrize("payload", [
    b"{not json",
    b"",
    b"[1, 2]",
    json.dumps({"input": {}}).encode(),
    json.dumps({"root_node_type_ref": {}, "input": "x"}).encode(),
    json.dumps({**START_BODY, "run_id": 7}).encode(),
    json.dumps({**START_BODY, "run_id": "a/b"}).encode(),
])
async def test_bad_start_requests_are_invalid_request(make_client: Any, payload: bytes) -> None:
    client = await make_client()
    resp = await client.post("/v1/runs", data=payload,
                             headers={"Content-Type": "application/json"})
    await _assert_error(resp, 400, "invalid_request")


@pytest.mark.asyncio
async def test_unknown_run_is_404_envelope(make_client: Any) -> None:
    client = await make_client()
    for resp in (await client.get("/v1/runs/nope"),
                 await client.post("/v1/runs/nope:cancel"),
                 await client.get("/v1/runs/nope/events")):
        body = await _assert_error(resp, 404, "run_not_found")
        assert body["error"]["details"] == {"run_id": "nope"}


@pytest.mark.asyncio
async def test_unrouted_paths_still_return_envelopes(make_client: Any) -> None:
    client = await make_client()
    await _assert_error(await client.get("/v1/nothing-here"), 404, "not_found")
    resp = await client.delete("/v1/runs")
    await _assert_error(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


@pytest.mark.asyncio
async def test_cancel_is_idempotent(make_client: Any) -> None:
    client = await make_client(step_delay_s=1.0)
    run = await _start_run(client)
    first = await client.post(f"/v1/runs/{run['run_id']}:cancel")
    assert first.status == 200
    first_body = await first.json()
    validate("core/run", first_body)
    assert first_body["state"] == "canceled"
    assert first_body["ended_at"].endswith("Z")

    second = await client.post(f"/v1/runs/{run['run_id']}:cancel")
    assert await second.json() == first_body
    assert await (await client.get(f"/v1/runs/{run['run_id']}")).json() == first_body


@pytest.mark.asyncio
async def test_cancel_after_completion_leaves_run_unchanged(make_client: Any) -> None:
    client = await make_client(step_delay_s=0.01)
    run = await _start_run(client)
    await _read_events(await client.get(f"/v1/runs/{run['run_id']}/events"))
    done = await (await client.get(f"/v1/runs/{run['run_id']}")).json()
    assert done["state"] == "succeeded" and "ended_at" in done
    resp = await client.post(f"/v1/runs/{run['run_id']}:cancel")
    assert await resp.json() == done


@pytest.mark.asyncio
async def test_events_stream_incrementally(make_client: Any) -> None:
    delay = 0.05
    client = await make_client(step_delay_s=delay)
    run = await _start_run(client)
    resp = await client.get(f"/v1/runs/{run['run_id']}/events")
    assert resp.status == 200
    assert resp.content_type == "application/x-ndjson"

    first_line = await asyncio.wait_for(resp.content.readline(), 5)
    first_at = time.monotonic()
    # The run must still be in flight when the first line reaches us.
    mid = await (await client.get(f"/v1/runs/{run['run_id']}")).json()
    assert mid["state"] == "running"

    rest = await _read_events(resp)
    events = [json.loads(first_line)] + [e for _, e in rest]
    _check_events(events, run["run_id"])
    assert [e["type"] for e in events] == EXPECTED_TYPES
    assert rest[-1][0] - first_at >= 3 * delay * 0.8
    assert events[-1]["data"] == {"state": "succeeded"}
    node_events = [e for e in events if e["type"] in ("node_run_assigned", "atomic_executed",
                                                      "node_evaluated")]
    assert all(e["node_run_id"] == run["root_node_run_id"] for e in node_events)

    final = await (await client.get(f"/v1/runs/{run['run_id']}")).json()
    validate("core/run", final)
    assert final["state"] == "succeeded" and final["ended_at"].endswith("Z")


@pytest.mark.asyncio
async def test_late_followers_get_full_history(make_client: Any) -> None:
    client = await make_client(step_delay_s=0.05)
    run = await _start_run(client)
    url = f"/v1/runs/{run['run_id']}/events"
    early = await client.get(url)
    for _ in range(2):
        await asyncio.wait_for(early.content.readline(), 5)

    mid_joiner = [e for _, e in await _read_events(await client.get(url))]
    await _read_events(early)
    after_end = [e for _, e in await _read_events(await client.get(url))]

    _check_events(mid_joiner, run["run_id"])
    assert [e["type"] for e in mid_joiner] == EXPECTED_TYPES
    assert after_end == mid_joiner


@pytest.mark.asyncio
async def test_cancel_ends_open_stream(make_client: Any) -> None:
    client = await make_client(step_delay_s=0.2)
    run = await _start_run(client)
    resp = await client.get(f"/v1/runs/{run['run_id']}/events")
    first = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
    assert first["type"] == "run_started"

    canceled = await client.post(f"/v1/runs/{run['run_id']}:cancel")
    assert (await canceled.json())["state"] == "canceled"
    rest = [e for _, e in await _read_events(resp, timeout=1.0)]
    events = [first] + rest
    _check_events(events, run["run_id"])
    assert events[-1]["type"] == "run_completed"
    assert events[-1]["data"] == {"state": "canceled"}
    # Nothing from the simulated script sneaks in after the cancel.
    await asyncio.sleep(0.3)  # longer than the script's step delay, a real timer in the dev coordinator
    again = [e for _, e in await _read_events(await client.get(f"/v1/runs/{run['run_id']}/events"))]
    assert again == events


@pytest.mark.asyncio
async def test_health_and_version(make_client: Any) -> None:
    client = await make_client()
    health = await (await client.get("/v1/health")).json()
    validate("common/health", health)
    assert health["status"] == "ok"
    version = await (await client.get("/v1/version")).json()
    validate("common/version_info", version)
    assert version["service_name"] == "arp-dev-run-coordinator"
    assert version["supported_api_versions"] == ["v1"]


@pytest.mark.asyncio
async def test_start_binds_real_port_and_cleans_up_in_flight_runs() -> None:
    runner, base_url = await start(step_delay_s=0.5)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        assert not base_url.endswith(":0")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url}/v1/health") as resp:
                validate("common/health", await resp.json())
            async with session.post(f"{base_url}/v1/runs", json=START_BODY) as resp:
                run_id = (await resp.json())["run_id"]
            stream = await session.get(f"{base_url}/v1/runs/{run_id}/events")
            # Cleanup with a run in flight and a stream open must be prompt
            # and leave no coordinator task behind.
            began = time.monotonic()
            await asyncio.wait_for(runner.cleanup(), 5)
            assert time.monotonic() - began < 2
            stream.close()
    finally:
        await runner.cleanup()
    leftovers = [t for t in asyncio.all_tasks()
                 if t.get_name().startswith("devcoordinator:") and not t.done()]
    assert leftovers == []
