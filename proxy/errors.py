"""ARP ErrorEnvelope answers: the one shape every gateway-made error takes.

    return error_response(404, "not_found", "No such route", request_id=rid)
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

JSON_CONTENT_TYPE = "application/json"


def envelope(code: str, message: str, *, details: dict[str, Any] | None = None,
             retryable: bool | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    if retryable is not None:
        error["retryable"] = retryable
    return {"error": error}


def error_response(status: int, code: str, message: str, *, request_id: str | None = None,
                   details: dict[str, Any] | None = None, retryable: bool | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An ErrorEnvelope response; `details.request_id` lets a user quote the failing call."""
    details = dict(details or {})
    if request_id:
        details["request_id"] = request_id
    body = json.dumps(envelope(code, message, details=details, retryable=retryable)).encode()
    return web.Response(status=status, body=body, content_type=JSON_CONTENT_TYPE, headers=headers)
