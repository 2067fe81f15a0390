"""The spec's OpenAPI document drives the live gateway (schemathesis), and the spec's JSON vectors.

Positive and negative cases for every operation of run-gateway.openapi.yaml,
sent with a valid token to a gateway in front of the dev coordinator: no 5xx,
every error body a schema-valid ErrorEnvelope, every 200 of a run operation a
schema-valid Run. Then the conformance vectors: each invalid RunStartRequest
gets 400 and is not forwarded, each valid one reaches the coordinator byte for
byte.
"""

from __future__ import annotations

import json
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.support.schemas import OPENAPI, SPEC, envelope_problems, run_problems
from tests.support.stack import ThreadedStack

SCHEMA = schemathesis.openapi.from_path(OPENAPI)
OPERATIONS = [(op.ok().method.upper(), op.ok().path) for op in SCHEMA.get_all_operations()]
RUN_OPERATIONS = {("POST", "/v1/runs"), ("GET", "/v1/runs/{run_id}"), ("POST", "/v1/runs/{run_id}:cancel")}


@pytest.fixture(scope="module")
def stack():
    with ThreadedStack(auth="required") as running:
        yield running


def _check(stack: ThreadedStack, case, token: str) -> None:
    headers = dict(case.headers or {})
    negative_auth = "Authorization" in headers  # the negative generator may send its own credentials
    if not negative_auth:
        headers["Authorization"] = f"Bearer {token}"
    rid = "st-" + uuid.uuid4().hex
    headers["X-Request-ID"] = rid
    response = case.call(base_url=stack.url, headers=headers, timeout=10, allow_redirects=False)
    status, body = response.status_code, response.content
    where = f"{case.method} {case.formatted_path} -> {status} {body[:300]!r}"
    assert status < 500, where
    if status >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: lower-case name -> values
        assert content_type.startswith("application/json"), where
        assert not envelope_problems(body), (envelope_problems(body), where)
        made_by_gateway = not stack.seen(rid)
        if made_by_gateway:
            assert json.loads(body)["error"]["details"]["request_id"] == rid, where
    elif status == 200 and (case.method, case.path) in RUN_OPERATIONS:
        assert not run_problems(body), (run_problems(body), where)


# health and version take no input at all, so there is nothing to negate.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if p not in ("/v1/health", "/v1/version")]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_openapi_cases_get_no_5xx_and_schema_valid_answers(stack, method, path, mode):
    operation = SCHEMA[path][method]
    token = stack.token()

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        sent.append(case)
        _check(stack, case, token)

    sent: list = []
    run()
    # health and version have exactly one possible request; every other operation has many.
    assert len(sent) >= (1 if path in ("/v1/health", "/v1/version") else 5), "the test would prove nothing"


def test_a_started_run_answers_schema_valid_runs_on_every_run_operation(stack):
    """Positive generation rarely guesses an existing run id: walk one real run through the spec."""
    token = {"Authorization": f"Bearer {stack.token()}", "Content-Type": "application/json"}
    status, _, body = stack.request("POST", "/v1/runs", headers=token, body=json.dumps(
        {"root_node_type_ref": {"node_type_id": "a.b", "version": "1"}, "input": {"x": 1}}).encode())
    assert status == 200 and not run_problems(body), body
    run_id = json.loads(body)["run_id"]
    for method, target in (("GET", f"/v1/runs/{run_id}"), ("POST", f"/v1/runs/{run_id}:cancel")):
        status, _, body = stack.request(method, target, headers=token, body=b"" if method == "POST" else None)
        assert status == 200 and not run_problems(body), (method, body)


# --------------------------------------------------------------------------- conformance vectors

VECTORS = SPEC / "conformance"


def _vectors(kind: str) -> list[tuple[str, bytes]]:
    out = []
    for path in sorted((VECTORS / kind / "run_gateway").rglob("*.json")):
        out.append((str(path.relative_to(VECTORS)), path.read_bytes()))
    return out


INVALID = _vectors("json_vectors_invalid")
VALID = _vectors("json_vectors")


def test_the_spec_ships_vectors_for_the_run_gateway():
    assert INVALID and VALID


@pytest.mark.parametrize("name, raw", INVALID, ids=[n for n, _ in INVALID])
def test_every_invalid_run_start_vector_is_400_and_never_forwarded(stack, name, raw):
    rid = "vec-" + uuid.uuid4().hex
    status, headers, body = stack.request("POST", "/v1/runs", body=raw, headers={
        "Authorization": f"Bearer {stack.token()}", "Content-Type": "application/json", "X-Request-ID": rid})
    assert status == 400, body
    assert not envelope_problems(body)
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert stack.seen(rid) == []


@pytest.mark.parametrize("name, raw", VALID, ids=[n for n, _ in VALID])
def test_every_valid_run_start_vector_is_forwarded_byte_for_byte(stack, name, raw):
    rid = "vec-" + uuid.uuid4().hex
    status, headers, body = stack.request("POST", "/v1/runs", body=raw, headers={
        "Authorization": f"Bearer {stack.token()}", "Content-Type": "application/json", "X-Request-ID": rid})
    seen = stack.seen(rid)
    assert [(m, p, b) for m, p, b, _ in seen] == [("POST", "/v1/runs", raw)]
    assert status == 200 and not run_problems(body), body
