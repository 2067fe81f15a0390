"""Property tests through the live gateway: hostile Authorization headers and hostile request targets.

Every example is a real HTTP request to a gateway (auth required, dev issuer,
recording dev coordinator behind it). The oracle is the wire contract, not the
code: RFC 6750 answers for credentials, the route table for targets, and the
coordinator's own record for "never forwarded" and "forwarded byte for byte".
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.arp.routes import CANCEL_RUN, GET_RUN, RUN_EVENTS, RouteTable
from tests.support.schemas import envelope_problems
from tests.support.stack import ThreadedStack

REALM = 'Bearer realm="arp-run-gateway"'
BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def stack():
    with ThreadedStack(auth="required") as running:
        yield running


def assert_gateway_error(status: int, headers, body: bytes) -> dict:
    assert status < 500, (status, body)
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    problems = envelope_problems(body)
    assert not problems, (problems, body)
    error = json.loads(body)["error"]
    assert error["details"]["request_id"] == headers["X-Request-ID"]
    return error


# --------------------------------------------------------------------------- Authorization

# What a client can put in a header value on the wire: visible ASCII, space, tab and obs-text.
HEADER_TEXT = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.sampled_from(" \t"),
                      max_size=300)
B64URL = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
                 max_size=120)


@st.composite
def broken_tokens(draw, stack_token: str) -> str:
    """A real token from the gateway's own issuer, made invalid in a way an attacker might try."""
    head, payload, signature = stack_token.split(".")
    how = draw(st.sampled_from(["flip", "truncate", "extra", "none_alg", "swap_sig", "random", "dots"]))
    if how == "flip":
        # Not the last two characters of a segment: their low bits may be base64 padding.
        part = draw(st.sampled_from([0, 1, 2]))
        segs = [head, payload, signature]
        seg = segs[part]
        i = draw(st.integers(0, len(seg) - 3))
        new = draw(st.sampled_from([c for c in "AQgwBRhx" if c != seg[i]]))
        segs[part] = seg[:i] + new + seg[i + 1:]
        return ".".join(segs)
    if how == "truncate":
        return stack_token[: draw(st.integers(1, len(stack_token) - 1))]
    if how == "extra":
        return stack_token + "." + draw(B64URL)
    if how == "none_alg":
        return "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + payload + "."
    if how == "swap_sig":
        return f"{head}.{payload}.{draw(B64URL)}"
    if how == "dots":
        return draw(st.sampled_from([".", "..", "...", "a.b", "a.b.c", "a..c", ".b.c."]))
    return draw(st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1, max_size=200))


def expected_auth_answer(values: list[str]) -> tuple[int, str | None]:
    """RFC 6750 section 3 as the gateway documents it: (status, the `error` of the challenge)."""
    if len(values) > 1:
        return 400, "invalid_request"
    if not values:
        return 401, None
    # The HTTP layer drops the value's surrounding whitespace (RFC 9110 5.5).
    scheme, _, token = values[0].strip(" \t").partition(" ")
    if scheme.lower() != "bearer":
        return 401, None
    if not token.strip(" \t"):
        return 400, "invalid_request"
    return 401, "invalid_token"


def check_auth_answer(stack: ThreadedStack, method: str, values: list[str]) -> None:
    rid = "prop-" + uuid.uuid4().hex
    run = "prop-run-" + uuid.uuid4().hex
    target, body = (f"/v1/runs/{run}", None) if method == "GET" else ("/v1/runs", b'{"input": {}}')
    headers = [("X-Request-ID", rid)] + [("Authorization", v) for v in values]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    status, got, raw = stack.request(method, target, body=body, headers=headers)
    want_status, want_error = expected_auth_answer(values)
    assert status == want_status, (values, status, raw)
    error = assert_gateway_error(status, got, raw)
    assert error["code"] == ("invalid_request" if status == 400 else "unauthorized")
    challenge = got.get("WWW-Authenticate", "")
    if want_error is None:
        assert challenge == REALM, challenge
    else:
        assert challenge.startswith(f'{REALM}, error="{want_error}"'), challenge
    assert stack.seen(rid) == [], "a refused request reached the coordinator"


@BOUNDED
@given(value=HEADER_TEXT)
@example(value="Bearer")
@example(value="Bearer ")
@example(value="bearer \t ")
@example(value="Basic dXNlcjpwYXNz")
@example(value="Bearer a b c")
@example(value="BEARER x.y.z")
@example(value="Bearer\tx.y.z")
@example(value="Bearer " + "A" * 9000)
def test_any_authorization_value_gets_the_rfc6750_answer_and_is_never_forwarded(stack, value):
    check_auth_answer(stack, "GET", [value])


@BOUNDED
@given(data=st.data())
def test_a_tampered_real_token_is_401_invalid_token_and_never_forwarded(stack, data):
    token = stack.token()
    broken = data.draw(broken_tokens(token))
    method = data.draw(st.sampled_from(["GET", "POST"]))
    check_auth_answer(stack, method, [f"Bearer {broken}"])


@settings(BOUNDED, max_examples=25)
@given(values=st.lists(HEADER_TEXT, min_size=2, max_size=4))
def test_several_authorization_headers_are_400_even_with_a_valid_one(stack, values):
    check_auth_answer(stack, "GET", [f"Bearer {stack.token()}"] + values[1:])


def test_the_valid_token_itself_passes(stack):
    """The control for the tests above: the same request with the untouched token is forwarded."""
    rid = "prop-" + uuid.uuid4().hex
    status, _, _ = stack.request("GET", "/v1/runs/none-such", headers=[
        ("X-Request-ID", rid), ("Authorization", f"Bearer {stack.token()}")])
    assert status == 404 and len(stack.seen(rid)) == 1      # the coordinator's own 404


# --------------------------------------------------------------------------- routes

TABLE = RouteTable()
PIECES = st.sampled_from([
    "a", "run_1", "..", ".", "%2e%2e", "%2E.", "%2f", "%2F", "%5c", "\\", "%00", "%", "%zz", "%25", "//", "/",
    ";", ";jsessionid=1", ":cancel", ":Cancel", "%3Acancel", ":cancel:cancel", ":", "events", "%65vents",
    "~", "@", "!", "$", "'", "(", "*", ",", "=", "+", "-", "é", "%C3%A9", "v1", "runs", "?", "#",
])
SEGMENT = st.lists(PIECES, min_size=0, max_size=4).map("".join)
TARGETS = st.one_of(
    st.builds(lambda s: f"/v1/runs/{s}", SEGMENT),
    st.builds(lambda s: f"/v1/runs/{s}:cancel", SEGMENT),
    st.builds(lambda s, t: f"/v1/runs/{s}/{t}", SEGMENT, SEGMENT),
    st.builds(lambda p, s: f"{p}{s}", st.sampled_from(["/v1/runs", "/v1//runs/", "//v1/runs/", "/v1/runs/./",
                                                         "/v1/./runs/", "/v1/runs/../", "/v1/RUNS/", "/v1/node-runs/",
                                                         "/v1/runs;/", "/V1/runs/", "/v1/runs%2F"]), SEGMENT),
)


def _ascii(target: str) -> str:
    # The request line is bytes on the wire: a raw non-ASCII character goes out as its UTF-8 escape.
    return "".join(c if ord(c) < 128 else "".join(f"%{b:02X}" for b in c.encode()) for c in target)


def _valid_target(target: str) -> bool:
    """RFC 3986 origin-form: allowed characters only, and every `%` starting a two-hex-digit escape."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%")
    return all(c in allowed for c in target) and re.fullmatch(r"([^%]|%[0-9A-Fa-f]{2})*", target) is not None


def check_target(stack: ThreadedStack, method: str, target: str) -> None:
    target = _ascii(target)
    if "#" in target:  # a fragment never goes on the wire
        target = target.split("#", 1)[0] or "/"
    path = target.split("?", 1)[0]
    route = TABLE.resolve(path)
    rid = "prop-" + uuid.uuid4().hex
    headers = [("X-Request-ID", rid), ("Authorization", f"Bearer {stack.token()}")]
    status, got, raw = stack.request(method, target, headers=headers, body=b"" if method == "POST" else None)
    assert status < 500, (target, status, raw)
    seen = stack.seen(rid)
    if not _valid_target(target):
        # The edge refuses what is not a valid request target before routing it.
        assert status == 400 and seen == [], (target, status, raw)
        assert assert_gateway_error(status, got, raw)["code"] == "invalid_request"
        return
    if route is None or route.name in ("health", "version", "livez", "readyz") or method not in route.methods:
        if route is None:
            assert status == 404, (target, status, raw)
        assert seen == [], f"{method} {target} reached the coordinator"
        if route is None or method not in route.methods:
            assert_gateway_error(status, got, raw)
        return
    # Matched: it went to the coordinator with exactly the target the client sent.
    assert route in (GET_RUN, CANCEL_RUN, RUN_EVENTS) or route.template == "/v1/runs"
    if route.template != "/v1/runs" and len(target) < 8000:   # the coordinator's own line limit is 8190
        assert seen, f"{method} {target} matched {route.template} but was not forwarded"
    if seen:
        assert [(m, p) for m, p, _, _ in seen] == [(method, target)]


@BOUNDED
@given(target=TARGETS, method=st.sampled_from(["GET", "POST"]))
@example(target="/v1/runs/..", method="GET")
@example(target="/v1/runs/%2e%2e/events", method="GET")
@example(target="/v1/runs/x%2F..%2F..%2Fnode-runs", method="GET")
@example(target="/v1/runs/a/../../node-runs/x", method="GET")
@example(target="/v1/runs/x;/events", method="GET")
@example(target="/v1/runs/:cancel", method="POST")
@example(target="/v1/runs/x:cancel/events", method="GET")
@example(target="/v1/runs/x%3Acancel", method="POST")
@example(target="/v1/runs//events", method="GET")
@example(target="/v1/runs/x?y=/../../admin", method="GET")
def test_nothing_unmatched_is_forwarded_and_matched_targets_pass_byte_for_byte(stack, target, method):
    check_target(stack, method, target)


@settings(BOUNDED, max_examples=10)
@given(length=st.integers(1000, 16000), suffix=st.sampled_from(["", ":cancel", "/events", "/events/x"]))
def test_very_long_run_ids_are_matched_or_refused_never_a_gateway_5xx(stack, length, suffix):
    check_target(stack, "POST" if suffix == ":cancel" else "GET", f"/v1/runs/{'r' * length}{suffix}")


# --------------------------------------------------------------------------- the route table alone

RAW_PATHS = st.one_of(TARGETS.map(_ascii).map(lambda t: t.split("?")[0].split("#")[0]),
                      st.text(max_size=200), st.builds(lambda s: "/v1/runs/" + s, st.text(max_size=200)))


@settings(max_examples=400, deadline=None, database=None)
@given(path=RAW_PATHS)
def test_route_table_never_matches_a_run_id_that_decodes_to_another_path(path):
    from urllib.parse import unquote

    route = TABLE.resolve(path)  # never raises
    if route not in (GET_RUN, CANCEL_RUN, RUN_EVENTS):
        return
    rest = path[len("/v1/runs/"):]
    run_id = rest.removesuffix("/events") if route is RUN_EVENTS else rest
    run_id = run_id.removesuffix(":cancel") if route is CANCEL_RUN else run_id
    assert run_id and "/" not in run_id
    decoded = unquote(run_id)
    assert "/" not in decoded and "\\" not in decoded and decoded not in (".", "..")


@settings(max_examples=200, deadline=None, database=None)
@given(run_id=st.text(st.sampled_from("abcXYZ019-._~:"), min_size=1, max_size=64))
def test_route_table_matches_every_safe_run_id(run_id):
    if run_id in (".", ".."):
        return
    # `:cancel` is the action suffix, whatever precedes it.
    want = CANCEL_RUN if run_id.endswith(":cancel") and run_id != ":cancel" else GET_RUN
    if run_id == ":cancel":
        assert TABLE.resolve(f"/v1/runs/{run_id}") is None
    else:
        assert TABLE.resolve(f"/v1/runs/{run_id}") is want
    assert TABLE.resolve(f"/v1/runs/{run_id}/events") is RUN_EVENTS
