"""The access log: one JSON line per request on stdout.

Lines are buffered and written in batches (at most every 0.2 s, or sooner
when many pile up): a write and flush per request would cost more than
everything else the gateway does for it. Logged are values the gateway itself
produced or checked (ids, route templates, sizes, auth reasons, the client
address, a configured issuer, the routed run id) and one header, the
User-Agent, cut to USER_AGENT_CHARS and JSON-escaped; never a token. The
subject only when configured. `upstream_ms` is null when the coordinator
never answered (unreachable, timed out, garbled), else the time to its headers.

    log = AccessLog(sys.stdout, log_subject=False)
    log.record(request_id=rid, method="POST", route="/v1/runs", status=200, seconds=0.0021, upstream_s=0.0015,
               bytes_in=120, bytes_out=180, auth_result="allowed", auth_reason="", subject=None,
               client="10.1.2.3", user_agent=b"curl/8.5.0", issuer="https://idp", run_id=None)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TextIO

from ..util.boundedcache import BoundedCache

log = logging.getLogger("proxy.observability.accesslog")

FLUSH_INTERVAL_S = 0.2
FLUSH_LINES = 256
USER_AGENT_CHARS = 256
RUN_ID_CHARS = 256
ERROR_LOG_INTERVAL_S = 10.0
# A client repeats who it is request after request (its auth result, address, User-Agent, issuer):
# each distinct combination is rendered into its part of the line once.
CALLER_CACHE = 1024


class AccessLog:
    def __init__(self, out: TextIO, *, log_subject: bool) -> None:
        self._out = out
        self._log_subject = log_subject
        self._pending: list[str] = []
        self._handle: asyncio.TimerHandle | None = None
        self._callers: BoundedCache[tuple[str, str, str, bytes | None, str | None], str] = \
            BoundedCache(CALLER_CACHE)
        self._caller = self._callers.getter(touch=False)
        self._issuers: dict[str, str] = {}   # only configured issuers reach here: a bounded set
        self._methods: dict[str, str] = {}   # llhttp parses only the methods it knows: a bounded set
        self._last_error: float | None = None

    def record(self, request_id: str, method: str, route: str, status: int, seconds: float,
               upstream_s: float | None, bytes_in: int, bytes_out: int, auth_result: str,
               auth_reason: str, subject: str | None, client: str, user_agent: bytes | None,
               issuer: str | None, run_id: str | None) -> None:
        # Positional from the observer: binding fifteen keywords per request costs more than the line.
        # A template, not json.dumps of a dict: every field is a number or a gateway-made token
        # (request ids are validated, routes are templates, reasons fixed words, the client an
        # address from the socket or one parsed as an address, the run id a routed path segment of
        # RFC 3986 characters, which hold no quote, backslash or control) except the method, the
        # user agent, the issuer and the subject, which are JSON-escaped.
        agent = user_agent[:USER_AGENT_CHARS] if user_agent is not None else None
        key = (auth_result, auth_reason, client, agent, issuer)
        caller = self._caller(key)
        if caller is None:
            caller = _CALLER % (auth_result, auth_reason, client,
                                "null" if agent is None else _dumps(agent.decode("utf-8", "replace")),
                                "null" if issuer is None else self._issuer(issuer))
            self._callers.put(key, caller)
        escaped_method = self._methods.get(method)
        if escaped_method is None:
            escaped_method = self._methods[method] = _dumps(method)
        # The time, inline: strftime once a second, the milliseconds from a table.
        now = time.time()
        whole = int(now)
        if whole != _second[0]:
            _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        upstream = "null" if upstream_s is None else "%.3f" % (upstream_s * 1000)
        # An f-string: its pieces are joined in one step, where a %-template parses itself per line.
        line = (f'{{"time":"{_second[1]}{_MILLIS[int((now - whole) * 1000)]}","type":"access","request_id":'
                f'"{request_id}","method":{escaped_method},"route":"{route}","status":{status},"duration_ms":'
                f'{seconds * 1000:.3f},"upstream_ms":{upstream},"bytes_in":{bytes_in},'
                f'"bytes_out":{bytes_out},{caller},"run_id":'
                f'{"null" if run_id is None else _quoted(run_id[:RUN_ID_CHARS])}}}')
        if self._log_subject and subject is not None:
            line = line[:-1] + ',"subject":' + _dumps(subject) + "}"
        self._pending.append(line)
        if len(self._pending) >= FLUSH_LINES:
            self.flush()
        elif self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)

    def _issuer(self, issuer: str) -> str:
        escaped = self._issuers.get(issuer)
        if escaped is None:
            escaped = self._issuers[issuer] = _dumps(issuer)
        return escaped

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._pending:
            lines = "\n".join(self._pending) + "\n"
            self._pending.clear()
            try:
                self._out.write(lines)
                self._out.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stdout must never fail a request; the lines are lost
            except Exception:
                # Anything else is a bug in the stream, not in the request that happened to fill the
                # batch: it must neither fail that request nor stop later flushes. Said once per interval.
                now = time.monotonic()
                if self._last_error is None or now - self._last_error >= ERROR_LOG_INTERVAL_S:
                    self._last_error = now
                    log.exception("access log write failed; %d lines lost", len(lines.splitlines()))


_CALLER = '"auth":"%s","auth_reason":"%s","client":"%s","user_agent":%s,"issuer":%s'

_dumps = json.JSONEncoder(ensure_ascii=True).encode
_second: list = [-1, ""]  # the last whole second seen, and its rendering
# Each millisecond's tail made once: formatting "%03d" per request costs more than an index. The
# fraction is exact and below 1, and below 1 times 1000 stays below 1000 in binary floating point.
_MILLIS = tuple(".%03dZ" % ms for ms in range(1000))


def _quoted(text: str) -> str:
    return '"' + text + '"'

