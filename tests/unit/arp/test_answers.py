"""proxy/arp/answers.py: every answer the gateway makes itself is a schema-valid ARP ErrorEnvelope."""

from __future__ import annotations

import json

import pytest

from proxy.arp.answers import RETRYABLE_STATUSES, error_answer, json_answer
from tests.support.schemas import envelope_problems


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 413, 415, 429, 431, 500, 502, 503, 504])
def test_an_error_answer_is_an_error_envelope_that_says_whether_to_retry(status: int) -> None:
    answer = error_answer(status, "some_code", "What went wrong", request_id="rid-1")
    assert answer.status == status and answer.content_type == b"application/json"
    assert envelope_problems(answer.body) == []
    error = json.loads(answer.body)["error"]
    assert (error["code"], error["message"]) == ("some_code", "What went wrong")
    assert error["details"] == {"request_id": "rid-1"}
    # A rate limit, a slow body or a coordinator or IdP that is down passes; anything else repeats.
    assert error["retryable"] is (status in {408, 429, 502, 503, 504})


def test_retryable_given_overrides_the_status_default() -> None:
    assert 503 in RETRYABLE_STATUSES
    error = json.loads(error_answer(503, "run_coordinator_missing", "None configured", retryable=False).body)["error"]
    assert error["retryable"] is False
    assert "details" not in error  # no request id, no details: the schema's details stay optional


def test_details_and_headers_are_kept() -> None:
    answer = error_answer(429, "rate_limited", "Slow down", request_id="rid-2",
                          details={"reason": "run_start_rate"}, headers={"Retry-After": "3"})
    assert envelope_problems(answer.body) == []
    assert json.loads(answer.body)["error"]["details"] == {"reason": "run_start_rate", "request_id": "rid-2"}
    assert answer.header("retry-after") == "3" and answer.header("X-Other") is None


def test_a_json_answer_carries_the_body_as_json() -> None:
    answer = json_answer(200, {"status": "ok", "checks": []})
    assert (answer.status, json.loads(answer.body), answer.content_type) == (
        200, {"status": "ok", "checks": []}, b"application/json")
