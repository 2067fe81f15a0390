"""Answers the gateway makes itself: ARP ErrorEnvelopes and its own JSON bodies.

An `Answer` is plain data; the listener turns it into bytes on the wire (and
the ops listener into an aiohttp response), so every gateway-made error has
one shape whichever listener serves it.

    return error_answer(404, "not_found", "No such route", request_id=rid)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

JSON = b"application/json"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[str, str], ...] = ()   # beyond framing, X-Request-ID and Date

    def header(self, name: str) -> str | None:
        low = name.lower()
        return next((value for key, value in self.headers if key.lower() == low), None)


# Refusals whose cause can pass (a slow body, a rate limit, a coordinator or IdP that is down or
# busy): the same request may succeed later. Any other refusal repeats until the request changes.
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})


def envelope(code: str, message: str, *, retryable: bool,
             details: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    error["retryable"] = retryable
    return {"error": error}


def json_answer(status: int, body: Any) -> Answer:
    return Answer(status, json.dumps(body).encode())


def error_answer(status: int, code: str, message: str, *, request_id: str | None = None,
                 details: dict[str, Any] | None = None, retryable: bool | None = None,
                 headers: dict[str, str] | None = None) -> Answer:
    """An ErrorEnvelope answer; `details.request_id` lets a user quote the failing call. Every envelope
    says whether to retry: `retryable` defaults from the status (RETRYABLE_STATUSES)."""
    details = dict(details or {})
    if request_id:
        details["request_id"] = request_id
    if retryable is None:
        retryable = status in RETRYABLE_STATUSES
    body = json.dumps(envelope(code, message, details=details, retryable=retryable)).encode()
    return Answer(status, body, JSON, tuple((headers or {}).items()))
