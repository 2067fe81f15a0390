"""The access log's line, field by field where the gateway formats it itself."""

from __future__ import annotations

import io
import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.observability import accesslog
from proxy.observability.accesslog import AccessLog


@pytest.mark.parametrize(("now", "stamp"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1.5, "1970-01-01T00:00:01.500Z"),
    (1765061905.25, "2025-12-06T22:58:25.250Z"),
    (math.nextafter(1765061906.0, 0), "2025-12-06T22:58:25.999Z"),
    (1765061906.0, "2025-12-06T22:58:26.000Z"),
])
def test_time_is_utc_to_the_millisecond(now: float, stamp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog.time, "time", lambda: now)
    out = io.StringIO()
    log = AccessLog(out, log_subject=False)
    log._lines._handle = object()  # type: ignore[assignment]  # no loop here: flushed by hand
    log.record("r1", "POST", "/v1/runs", 200, 0.0012345, None, 2, 3, "allowed", "", None, "127.0.0.1",
               None, None, None)
    log._lines._handle = None
    log.flush()
    line = json.loads(out.getvalue())
    assert line["time"] == stamp
    assert line["duration_ms"] == 1.234 and line["upstream_ms"] is None


def test_each_request_names_its_own_caller() -> None:
    """Callers rendered once are still told apart: a line never carries another request's client,
    User-Agent, issuer or auth outcome."""
    out = io.StringIO()
    log = AccessLog(out, log_subject=False)
    log._lines._handle = object()  # type: ignore[assignment]
    callers = [("allowed", "", "10.0.0.1", b"curl/8", "https://a"), ("allowed", "", "10.0.0.2", b"curl/8", "https://a"),
               ("denied", "scope", "10.0.0.1", b"curl/8", "https://a"), ("allowed", "", "10.0.0.1", None, None),
               ("allowed", "", "10.0.0.1", b'say "hi"\x01', "https://b")]
    for auth, reason, client, agent, issuer in callers * 2:
        log.record("r1", "GET", "/v1/runs/{run_id}", 200, 0.001, 0.001, 0, 10, auth, reason, None, client,
                   agent, issuer, "run-1")
    log._lines._handle = None
    log.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    seen = [(line["auth"], line["auth_reason"], line["client"], line["user_agent"], line["issuer"]) for line in lines]
    expected = [(a, r, c, None if u is None else u.decode(), i) for a, r, c, u, i in callers] * 2
    assert seen == expected
    assert all(line["run_id"] == "run-1" and line["method"] == "GET" for line in lines)
    assert list(lines[0]) == ["time", "type", "request_id", "method", "route", "status", "duration_ms", "upstream_ms",
                              "bytes_in", "bytes_out", "auth", "auth_reason", "client", "user_agent", "issuer",
                              "run_id"]


@settings(max_examples=300, deadline=None)
@example(seconds=5e-07, upstream_s=2.5e-06, method="POST", agent=None, issuer=None, subject=None)  # half-µs ties
@example(seconds=1e9 + 0.0005, upstream_s=0.0, method="GET", agent=b"", issuer="", subject="")
@given(seconds=st.floats(0, 3600), upstream_s=st.none() | st.floats(0, 3600), method=st.text(max_size=8),
       agent=st.none() | st.binary(max_size=300), issuer=st.none() | st.text(max_size=20),
       subject=st.none() | st.text(max_size=20))
def test_every_line_is_json_with_the_values_given(seconds: float, upstream_s: float | None, method: str,
                                                 agent: bytes | None, issuer: str | None,
                                                 subject: str | None) -> None:
    """Hostile text where the gateway takes it from outside (User-Agent bytes, a subject, an issuer,
    a method) still makes one valid JSON line, and the durations carry the digits "%.3f" gives."""
    out = io.StringIO()
    log = AccessLog(out, log_subject=True)
    log._lines._handle = object()  # type: ignore[assignment]
    log.record("r1", method, "/v1/runs", 200, seconds, upstream_s, 1, 2, "allowed", "", subject, "127.0.0.1",
               agent, issuer, None)
    log._lines._handle = None
    log.flush()
    [text] = out.getvalue().splitlines()
    line = json.loads(text)
    assert f'"duration_ms":{"%.3f" % (seconds * 1000)},' in text
    assert f'"upstream_ms":{"null" if upstream_s is None else "%.3f" % (upstream_s * 1000)},' in text
    assert line["method"] == method and line["issuer"] == issuer and line.get("subject") == subject
    assert line["user_agent"] == (None if agent is None else agent[:accesslog.USER_AGENT_CHARS].decode("utf-8", "replace"))
