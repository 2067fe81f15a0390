"""The access log: one JSON line per request on stdout.

Lines are buffered and written in batches (at most every 0.2 s, or sooner
when many pile up): a write and flush per request would cost more than
everything else the gateway does for it. Only values the gateway itself
produced are logged (ids, route templates, sizes, auth reasons), never a
header, so no token can leak here; the subject only when configured.

    log = AccessLog(sys.stdout, log_subject=False)
    log.record(rid, "POST", "/v1/runs", 200, 0.0021, 0.0015, 120, 180, "allowed", "", None)
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TextIO

FLUSH_INTERVAL_S = 0.2
FLUSH_LINES = 256


class AccessLog:
    def __init__(self, out: TextIO, *, log_subject: bool) -> None:
        self._out = out
        self._log_subject = log_subject
        self._pending: list[str] = []
        self._handle: asyncio.TimerHandle | None = None
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode

    def record(self, request_id: str, method: str, route: str, status: int, seconds: float,
               upstream_s: float | None, bytes_in: int, bytes_out: int, auth_result: str,
               auth_reason: str, subject: str | None) -> None:
        entry = {
            "time": _timestamp(), "type": "access", "request_id": request_id, "method": method,
            "route": route, "status": status, "duration_ms": round(seconds * 1000, 3),
            "upstream_ms": None if upstream_s is None else round(upstream_s * 1000, 3),
            "bytes_in": bytes_in, "bytes_out": bytes_out, "auth": auth_result, "auth_reason": auth_reason,
        }
        if self._log_subject and subject is not None:
            entry["subject"] = subject
        self._pending.append(self._dumps(entry))
        if len(self._pending) >= FLUSH_LINES:
            self.flush()
        elif self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._pending:
            self._out.write("\n".join(self._pending) + "\n")
            self._pending.clear()
            self._out.flush()


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
