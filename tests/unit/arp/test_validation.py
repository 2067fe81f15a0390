"""RunStartRequest edge validation (fastjsonschema accepts, jsonschema lists problems) against the spec's own vectors."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# -- the plain-shape shortcut: it may only say yes where the full schema check does

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
_NAMES = st.sampled_from(["node_type_id", "version", "extensions", "run_id", "input"]) | st.text(max_size=6)


@st.composite
def _near(draw: st.DrawFn, valid: dict[str, st.SearchStrategy]) -> object:
    """An object with the given keys and valid values, then often one change: a key gone, one
    more (a known name or any), a value of any JSON type; or not an object at all."""
    change = draw(st.integers(0, 9))
    if change == 0:
        return draw(_JSON)
    document = {name: draw(values) for name, values in valid.items()}
    if change == 1:
        del document[draw(st.sampled_from(sorted(document)))]
    elif change == 2:
        document[draw(_NAMES)] = draw(_JSON)
    elif change == 3:
        document[draw(st.sampled_from(sorted(document)))] = draw(_JSON)
    return document


_REF = _near({"node_type_id": st.text(max_size=4), "version": st.text(max_size=4)})
_INPUT = st.dictionaries(st.text(max_size=4), _JSON, max_size=3) | _JSON
_OPTIONAL = {"run_id": st.text(max_size=6) | _JSON, "run_context": st.just({}) | _JSON,
             "metadata": st.just({"labels": {}}) | _JSON, "extensions": st.just({"acme.x": 1}) | _JSON,
             "constraints": st.just({}) | _JSON, "other": _JSON}


@st.composite
def near_plain_documents(draw: st.DrawFn) -> object:
    """Run starts near the plain shape, so that both verdicts come up often: the two required
    fields (each valid or near it), sometimes an optional one, sometimes one change at the top."""
    document = draw(_near({"root_node_type_ref": _REF, "input": _INPUT}))
    if isinstance(document, dict) and draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(_OPTIONAL)))
        document[name] = draw(_OPTIONAL[name])
    return document


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_plain_documents())
def test_the_plain_shape_shortcut_accepts_only_what_the_schema_accepts(document: object) -> None:
    """A run start body gets exactly the verdict and problems the full check gives, shortcut or not."""
    full, rules = _checkers()
    if validation.plainly_valid(document):
        assert full(document) == []
    assert rules._problems(json.dumps(document).encode()) == full(json.loads(json.dumps(document)))


@pytest.mark.parametrize("document", [
    {"root_node_type_ref": {"node_type_id": "a", "version": "1"}, "input": {}},
    {"root_node_type_ref": {"node_type_id": "", "version": ""}, "input": {"x": [1, None]}, "run_id": "r-1"},
])
def test_the_plain_shape_takes_the_shortcut(document: dict) -> None:
    assert validation.plainly_valid(document)
    assert load_run_start_validator()(document) == []


class _Limits:
    max_body_bytes = 1 << 20
    body_timeout_s = 5.0


@functools.cache
def _checkers() -> tuple[Callable[[object], list[dict[str, str]]], validation.BodyRules]:
    return load_run_start_validator(), validation.BodyRules(_Limits())


def _mutated(text: str, cut: int, insert: str) -> bytes:
    at = cut % (len(text) + 1)
    return (text[:at] + insert + text[at:]).encode("utf-8", "surrogatepass")


_INSERTS = st.sampled_from(["", " ", ",", "}", '"', "\\ud800", "\\u00e9", "1e400", "99999999999999999999", "NaN",
                            "\ufeff", "\x00", "\x0c", '"x":1,', '"input":{},', "\ud800"]) | st.text(max_size=3)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_plain_documents(), st.integers(0, 200), _INSERTS)
def test_a_body_gets_the_problems_json_alone_gives(document: object, cut: int, insert: str) -> None:
    """With orjson in front for the plain shape, every body, garbled or not, gets exactly the verdict and
    problems (messages included) of json's decoder and the full check alone."""
    _, rules = _checkers()
    for body in (json.dumps(document).encode(), _mutated(json.dumps(document), cut, insert)):
        fast = rules._problems(body)
        saved = validation._loads
        validation._loads = _refuse  # json alone, as before orjson
        try:
            assert fast == rules._problems(body), body
        finally:
            validation._loads = saved


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_plain_documents(), st.integers(0, 200), _INSERTS)
def test_a_kept_node_type_comes_with_the_same_verdict_and_is_json_s(document: object, cut: int,
                                                                           insert: str) -> None:
    """With keep_documents (an audit trail), the plain shape's node type read by orjson is kept: every
    body gets the verdict and problems it gets without, and the kept node type is json's."""
    _, rules = _checkers()
    kept = validation.BodyRules(_Limits(), keep_documents=True)
    for body in (json.dumps(document).encode(), _mutated(json.dumps(document), cut, insert)):
        problems = kept._problems(body)
        assert problems == rules._problems(body), body
        if problems:
            continue
        ref = json.loads(body)["root_node_type_ref"]
        assert kept.node_type == (ref["node_type_id"], ref["version"]), body


def _refuse(body: bytes) -> object:
    raise ValueError("json alone")


def test_kept_node_types_are_what_the_run_starts_name():
    from types import SimpleNamespace

    from proxy.arp.routes import START_RUN
    from proxy.arp.validation import BodyRules

    limits = SimpleNamespace(max_body_bytes=1024, body_timeout_s=1.0)
    head = SimpleNamespace(method="POST", request_id="r", content_type=b"application/json",
                           content_encoding=None, content_length=None)
    body = json.dumps({"root_node_type_ref": {"node_type_id": "n", "version": "1"}, "input": {}}).encode()
    kept = BodyRules(limits, keep_documents=True)
    assert kept.checked(head, START_RUN, body) == body
    assert kept.node_type == ("n", "1")
    refused = kept.checked(head, START_RUN, b"{not json")
    assert refused.status == 400 and kept.node_type is None   # and the message is the usual one
    assert "not valid JSON" in json.loads(refused.body)["error"]["details"]["errors"][0]["message"]
    plain = BodyRules(limits)
    plain.checked(head, START_RUN, body)
    assert plain.node_type is None
    # An invalid start still names its node type, for its record; an unusable one names none.
    for document, named in (({"root_node_type_ref": {"node_type_id": "n", "version": 2}}, ("n", None)),
                            ({"root_node_type_ref": {"node_type_id": ["n"]}}, None), ([1], None)):
        assert kept.checked(head, START_RUN, json.dumps(document).encode()).status == 400
        assert kept.node_type == named
