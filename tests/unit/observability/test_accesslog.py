"""The access log's line, field by field where the gateway formats it itself."""

from __future__ import annotations

import io
import json
import math

import pytest

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
