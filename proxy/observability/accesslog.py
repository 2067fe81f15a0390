"""The access log: one JSON line per request on stdout.

Lines are buffered and written in batches (at most every 0.2 s, or sooner
when many pile up) through the stream's shared `LineOut` (lines.py), which
the audit trail's stdout sink writes through too: a write and flush per
request would cost more than everything else the gateway does for it. Logged are values the gateway itself
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

import json
import time
from typing import TextIO

from ..util.boundedcache import BoundedCache
from ..util.clock import rfc3339_millis
from .lines import FLUSH_INTERVAL_S, FLUSH_LINES, shared

__all__ = ["FLUSH_INTERVAL_S", "FLUSH_LINES", "AccessLog"]

USER_AGENT_CHARS = 256
RUN_ID_CHARS = 256
# A client repeats who it is request after request (its auth result, address, User-Agent, issuer):
# each distinct combination is rendered into its part of the line once.
CALLER_CACHE = 1024


class AccessLog:
    def __init__(self, out: TextIO, *, log_subject: bool) -> None:
        self._lines = shared(out)
        self._add = self._lines.add
        self._log_subject = log_subject
        self._callers: BoundedCache[tuple[str, str, str, bytes | None, str | None], str] = \
            BoundedCache(CALLER_CACHE)
        self._caller = self._callers.getter(touch=False)
        self._issuers: dict[str, str] = {}   # only configured issuers reach here: a bounded set
        self._methods: dict[str, str] = {}   # llhttp parses only the methods it knows: a bounded set

    def record(self, request_id: str, method: str, route: str, status: int, seconds: float,
               upstream_s: float | None, bytes_in: int, bytes_out: int, auth_result: str,
               auth_reason: str, subject: str | None, client: str, user_agent: bytes | None,
               issuer: str | None, run_id: str | None) -> str:
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
        upstream = "null" if upstream_s is None else "%.3f" % (upstream_s * 1000)
        stamp = rfc3339_millis(time.time())
        # An f-string: its pieces are joined in one step, where a %-template parses itself per line.
        line = (f'{{"time":"{stamp}","type":"access","request_id":'
                f'"{request_id}","method":{escaped_method},"route":"{route}","status":{status},"duration_ms":'
                f'{seconds * 1000:.3f},"upstream_ms":{upstream},"bytes_in":{bytes_in},'
                f'"bytes_out":{bytes_out},{caller},"run_id":'
                f'{"null" if run_id is None else _quoted(run_id[:RUN_ID_CHARS])}}}')
        if self._log_subject and subject is not None:
            line = line[:-1] + ',"subject":' + _dumps(subject) + "}"
        self._add(line)
        return stamp   # the line's time, which the request's audit record carries too

    def flush(self) -> None:
        self._lines.flush()

    def _issuer(self, issuer: str) -> str:
        escaped = self._issuers.get(issuer)
        if escaped is None:
            escaped = self._issuers[issuer] = _dumps(issuer)
        return escaped


_CALLER = '"auth":"%s","auth_reason":"%s","client":"%s","user_agent":%s,"issuer":%s'

_dumps = json.JSONEncoder(ensure_ascii=True).encode


def _quoted(text: str) -> str:
    return '"' + text + '"'

