"""The caller bound into a run start: what is written, what is refused, and what is left as it was."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.arp.runcontext import BindRefusal, RunBinder, RunOwner, read_run, trace_ids

ISS, SUB = "https://idp.example", "alice"
CLAIMS = {"iss": ISS, "sub": SUB, "tenant": "A", "email": "alice@example.test", "groups": ["x"]}
REF = {"node_type_id": "jarvis.composite.planner.general", "version": "0.3.3"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def bind(body: bytes, binder: RunBinder | None = None, claims: dict | None = None, traceparent: str | None = None):
    binder = binder or RunBinder(tenant_claim="tenant")
    caller = binder.caller(ISS, SUB, CLAIMS if claims is None else claims)
    if isinstance(caller, BindRefusal):
        return caller
    return binder.bind(body, caller, "req-1", traceparent)


def test_the_caller_is_written_into_run_context():
    out = bind(json.dumps({"root_node_type_ref": REF, "input": {}}).encode(),
               RunBinder(identity_claims=("email", "missing"), tenant_claim="tenant"), traceparent=TRACEPARENT)
    context = json.loads(out)["run_context"]
    assert context == {"identity": {"iss": ISS, "sub": SUB, "email": "alice@example.test"},
                       "actor": {"type": "principal", "id": SUB}, "tenant_id": "A",
                       "trace": {"request_id": "req-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                                 "span_id": "00f067aa0ba902b7"}}


@pytest.mark.parametrize("member, value", [
    ("identity", {"iss": ISS, "sub": "mallory"}),
    ("identity", {"iss": ISS, "sub": SUB, "admin": True}),
    ("actor", {"type": "service", "id": SUB}),
    ("tenant_id", "B"),
])
def test_a_different_client_value_is_refused_or_overwritten(member, value):
    body = json.dumps({"input": {}, "run_context": {member: value}, "root_node_type_ref": REF}).encode()
    assert bind(body) == BindRefusal("run_context_mismatch", member)
    out = json.loads(bind(body, RunBinder(tenant_claim="tenant", overwrite=True)))
    assert out["run_context"]["identity"] == {"iss": ISS, "sub": SUB}
    assert out["run_context"]["actor"] == {"type": "principal", "id": SUB} and out["run_context"]["tenant_id"] == "A"


def test_equal_client_values_pass():
    context = {"identity": {"iss": ISS, "sub": SUB}, "actor": {"type": "principal", "id": SUB}, "tenant_id": "A"}
    out = bind(json.dumps({"input": {}, "run_context": context, "root_node_type_ref": REF}).encode())
    assert json.loads(out)["run_context"]["identity"] == {"iss": ISS, "sub": SUB}


def test_a_tenant_nothing_vouches_for_is_a_conflict():
    body = json.dumps({"input": {}, "run_context": {"tenant_id": "A"}, "root_node_type_ref": REF}).encode()
    assert bind(body, RunBinder()) == BindRefusal("run_context_mismatch", "tenant_id")
    assert "tenant_id" not in json.loads(bind(body, RunBinder(overwrite=True)))["run_context"]


@pytest.mark.parametrize("claims", [{}, {"tenant": ""}, {"tenant": ["A"]}, {"tenant": {"id": "A"}}])
def test_no_usable_tenant_claim_starts_nothing(claims):
    body = json.dumps({"input": {}, "root_node_type_ref": REF}).encode()
    assert bind(body, claims=claims) == BindRefusal("missing_tenant_claim", "tenant_id")


def test_run_context_named_twice_is_refused():
    body = b'{"input":{},"run_context":{"identity":{"sub":"x"}},"root_node_type_ref":{},"run_context":{}}'
    assert bind(body) == BindRefusal("duplicate_member", "run_context")


def test_numbers_outside_run_context_keep_their_spelling():
    body = b'{"input": {"big": 1e400, "f": 1.0E2, "i": -0, "s": "\\u00e9\\ud83d\\ude00"}, "root_node_type_ref": {}}'
    out = bind(body)
    assert out.startswith(b'{"input": {"big": 1e400, "f": 1.0E2, "i": -0, "s": "\\u00e9\\ud83d\\ude00"}, ')


@pytest.mark.parametrize("value", [
    None, "", "junk", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    TRACEPARENT + "-extra",
])
def test_only_a_valid_traceparent_gives_trace_ids(value):
    expected = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7") if value and value.startswith("01-") else None
    assert trace_ids(value) == expected
    assert trace_ids(TRACEPARENT) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")


def test_the_owner_of_a_run():
    assert RunOwner.of({"identity": {"iss": ISS, "sub": SUB}, "tenant_id": "A"}) == RunOwner(ISS, SUB, "A")
    assert RunOwner.of(None) == RunOwner(None, None, None)
    assert RunOwner.of({"identity": {"iss": 1, "sub": ["x"]}}) == RunOwner(None, None, None)
    assert RunOwner.of([]) == RunOwner(None, None, None)


# --------------------------------------------------------------------------- property

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_names = st.sampled_from(["run_id", "input", "metadata", "constraints", "extensions"])
_contexts = st.fixed_dictionaries({}, optional={
    "policy": st.dictionaries(st.text(max_size=6), _json, max_size=3),
    "budgets": st.dictionaries(st.text(max_size=6), _json, max_size=3),
    "extensions": st.dictionaries(st.text(max_size=6), _json, max_size=2),
    "trace": st.fixed_dictionaries({}, optional={"trace_id": st.text(max_size=8), "span_id": st.text(max_size=8)}),
    "identity": st.just({"iss": ISS, "sub": SUB}),
    "actor": st.just({"type": "principal", "id": SUB}),
})


@settings(max_examples=200, deadline=None)
@given(members=st.lists(st.tuples(_names, _json), max_size=5, unique_by=lambda m: m[0]),
       context=st.none() | _contexts, at=st.integers(min_value=0, max_value=6), indent=st.sampled_from([None, 1]))
def test_only_run_context_changes(members, context, at, indent):
    items = [("root_node_type_ref", REF), *members]
    if context is not None:
        items.insert(min(at, len(items)), ("run_context", context))
    sent = dict(items)
    out = bind(json.dumps(sent, indent=indent).encode(), RunBinder(tenant_claim="tenant"))
    assert not isinstance(out, BindRefusal), out
    got = json.loads(out)
    names = [name for name, _ in items]
    expected_order = names if context is not None else [*names, "run_context"]
    assert list(got) == expected_order                             # the order of members is kept
    for name, value in items:
        if name != "run_context":
            assert got[name] == value                              # every other member keeps its value
    bound = got["run_context"]
    for name, value in (context or {}).items():
        if name != "trace":
            assert bound[name] == value                            # and the rest of run_context too
    assert bound["identity"] == {"iss": ISS, "sub": SUB} and bound["tenant_id"] == "A"
    assert bound["trace"]["request_id"] == "req-1"


def test_an_escaped_run_context_key_is_still_the_run_context():
    body = b'{"input":{},"run\\u005fcontext":{"actor":{"type":"principal","id":"mallory"}},"root_node_type_ref":{}}'
    assert bind(body) == BindRefusal("run_context_mismatch", "actor")


@pytest.mark.parametrize("traceparent", [None, TRACEPARENT])
def test_the_quick_and_the_merging_paths_write_the_same_run_context(traceparent):
    binder = RunBinder(identity_claims=("email", "groups", "sub"), tenant_claim="tenant")
    quick = json.loads(bind(b'{"input":{},"root_node_type_ref":{}}', binder, traceparent=traceparent))
    # A backslash anywhere in the body sends it down the merging path.
    merged = json.loads(bind(b'{"input":{"x":"\\u0041"},"root_node_type_ref":{}}', binder, traceparent=traceparent))
    assert json.dumps(quick["run_context"]) == json.dumps(merged["run_context"])   # members and their order


@pytest.mark.parametrize("body", [
    b'{"run_id":"r1","run_context":{"identity":{"iss":"i","sub":"alice"},"tenant_id":"A"}}',
    b' \n{"run_id":"r1","n":99999999999999999999999} ',
    b'{"run_id":"r1","x":NaN,"y":1e400,"z":-Infinity}',    # orjson refuses these, json reads them
    b'{"run_id":"r1","s":"\\ud800"}',                        # a lone surrogate, likewise
    b'{"run_id":"r1","run_context":{"identity":{"iss":"i","sub":"\\ud800"},"n":1e400}}',
    b'{"run_id":"r1","run_id":"r2","run_context":{"tenant_id":"A"},"run_context":{"tenant_id":"B"}}',
    b'{"run_context":{"identity":{"iss":"i","sub":"bob"}},"run_id":7}', b'{"run_id":null}', b"{}",
    b'{"run_id":"r1"} trailing', b"", b"\xff\xfe", b"[" * 5000, b'"just a string"', b'[{"run_id":"r1"}]',
])
def test_read_run_reads_a_coordinator_answer_as_json_does(body: bytes) -> None:
    try:
        expected = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        expected = None
    found = read_run(body)
    if isinstance(expected, dict):
        assert found is not None
        assert found.run_id == expected.get("run_id")
        assert RunOwner.of(found.run_context) == RunOwner.of(expected.get("run_context"))
    else:
        assert found is None


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20),
       st.sampled_from(["run_id", "run_context", "identity", "x"]))
def test_read_run_agrees_with_json_on_generated_answers(value: object, name: str) -> None:
    """Any document: the two members json reads are the two read_run gives."""
    body = json.dumps({"state": [value], name: value, "run_id": "r" if name != "run_id" else value}).encode()
    expected = json.loads(body)
    found = read_run(body)
    assert found is not None
    assert found.run_id == expected.get("run_id")
    assert found.run_context == expected.get("run_context")
