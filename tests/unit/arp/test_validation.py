"""RunStartRequest edge validation (fastjsonschema accepts, jsonschema lists problems) against the spec's own vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy.arp import validation as validation

from proxy.arp.validation import SCHEMA_DIR, compile_schema, load_run_start_validator
from tests.support.gateway import SPEC

SCHEMAS = SPEC / "schemas"
VALID = json.loads((SPEC / "conformance/json_vectors/run_gateway/runs/run_start_request.json").read_text())
INVALID = json.loads((SPEC / "conformance/json_vectors_invalid/run_gateway/runs/run_start_request.json").read_text())


def reference_validator() -> Draft202012Validator:
    registry = Registry()
    for path in SCHEMAS.rglob("*.json"):
        registry = registry.with_resource(path.as_uri(), Resource.from_contents(
            json.loads(path.read_text()), default_specification=DRAFT202012))
    target = SCHEMAS / "run_gateway/runs/run_start_request.schema.json"
    return Draft202012Validator({"$ref": target.as_uri()}, registry=registry)


CASES = [
    VALID,
    INVALID,
    {},
    [],
    "text",
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {"x": [1, {"y": None}]}},
    {"root_node_type_ref": {"node_type_id": 3}, "input": [], "surprise": True},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1", "extensions": {"acme.x": 1}}, "input": {}},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1", "extensions": {"nodot": 1}}, "input": {}},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {}, "run_id": 5},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {},
     "constraints": {"budgets": {"max_steps": -1, "max_cost": 1.5}, "gates": {"side_effect_class": "delete"},
                     "candidates": {"allowed_node_type_ids": ["a", 2]}}},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {},
     "run_context": {"actor": {"type": "user"}, "trace": {"trace_id": "t", "other": 1}, "tenant_id": "t"}},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {},
     "metadata": {"labels": {"a": "b", "c": 1}, "annotations": []}},
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {},
     "constraints": {"structural": {"max_depth": 2.0}, "budgets": {"max_steps": 1.5}}},
    {"root_node_type_ref": None, "input": True},
]


@pytest.mark.parametrize("document", CASES)
def test_compiled_validator_agrees_with_jsonschema(document):
    ours = load_run_start_validator()(document)
    theirs = list(reference_validator().iter_errors(document))
    assert bool(ours) == bool(theirs), (ours, [e.message for e in theirs])
    assert len(ours) >= len(theirs) or not theirs


def test_problems_name_each_path():
    problems = load_run_start_validator()(CASES[6])
    assert {p["path"] for p in problems} == {"root_node_type_ref.node_type_id", "root_node_type_ref.version",
                                             "input", "surprise"}


def test_schema_copies_match_the_spec():
    for copy in SCHEMA_DIR.rglob("*.schema.json"):
        original = SCHEMAS / copy.relative_to(SCHEMA_DIR)
        assert json.loads(copy.read_text()) == json.loads(original.read_text()), copy


@pytest.mark.parametrize("document", CASES)
def test_fast_verdict_and_listed_problems_agree(document):
    """fastjsonschema decides; jsonschema's list is empty exactly when fastjsonschema accepts."""
    fast = validation._accepting(SCHEMA_DIR / validation.RUN_START_SCHEMA)
    try:
        fast(document)
        accepted = True
    except Exception:
        accepted = False
    listed = [e for e in validation._listing(SCHEMA_DIR / validation.RUN_START_SCHEMA).iter_errors(document)]
    assert accepted == (not listed)


def test_problem_messages_keep_their_wording():
    problems = load_run_start_validator()(CASES[10])
    assert {(p["path"], p["message"]) for p in problems} == {
        ("constraints.budgets.max_steps", "must be >= 0"),
        ("constraints.gates.side_effect_class", "must be one of read, write, irreversible"),
        ("constraints.candidates.allowed_node_type_ids[1]", "must be of type string, not integer"),
    }
    assert load_run_start_validator()([]) == [{"path": "$", "message": "must be of type object, not array"}]
    assert {"path": "root_node_type_ref", "message": "is required"} in load_run_start_validator()({"input": {}})


def test_references_resolve_only_inside_the_schema_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(validation, "SCHEMA_DIR", tmp_path)
    validation._read.cache_clear()
    schema = tmp_path / "s.schema.json"
    schema.write_text(json.dumps({"properties": {"x": {"$ref": "https://example.invalid/other.json"}}}))
    with pytest.raises(ValueError, match="network refused"):
        compile_schema(schema)
    with pytest.raises(ValueError, match="outside"):
        validation._read((tmp_path.parent / "elsewhere.json").as_uri())
    validation._read.cache_clear()


@pytest.mark.parametrize("text", [
    '{"input": {}}', ' {"input": {}}', '{"input": {}} \n', '{"a": 1} x', '{"a": 1}{}', '', ' ', '[1, 2',
    '{"a": NaN}', '{"a": -Infinity}', '"x"', '1', 'null', '{"a": "\\ud800"}', '{"a": 1,}',
])
def test_the_body_decoder_answers_as_json_does(text: str) -> None:
    """The scanner called directly gives the document, or the error and message, json's decode gives."""
    def outcome(decode):
        try:
            return ("ok", decode(text))
        except (ValueError, RecursionError) as exc:
            return (type(exc).__name__, str(exc))
    assert outcome(validation._decode) == outcome(validation._DECODE)


def test_kept_documents_are_the_run_starts_as_decoded():
    from types import SimpleNamespace

    from proxy.arp.routes import START_RUN
    from proxy.arp.validation import BodyRules

    limits = SimpleNamespace(max_body_bytes=1024, body_timeout_s=1.0)
    head = SimpleNamespace(method="POST", request_id="r", content_type=b"application/json",
                           content_encoding=None, content_length=None)
    body = json.dumps({"root_node_type_ref": {"node_type_id": "n", "version": "1"}, "input": {}}).encode()
    kept = BodyRules(limits, keep_documents=True)
    assert kept.checked(head, START_RUN, body) == body
    assert kept.document["root_node_type_ref"] == {"node_type_id": "n", "version": "1"}
    refused = kept.checked(head, START_RUN, b"{not json")
    assert refused.status == 400 and kept.document is None   # and the message is the usual one
    assert "not valid JSON" in json.loads(refused.body)["error"]["details"]["errors"][0]["message"]
    plain = BodyRules(limits)
    plain.checked(head, START_RUN, body)
    assert plain.document is None
