"""The public route table: what the gateway answers, and nothing else.

Only the run surface of the Run Gateway contract is forwarded; the
coordinator's node-run APIs stay unreachable because no route names them.
Matching works on the raw (still percent-encoded) path so what is matched is
exactly what is forwarded.

    route = resolve("/v1/runs/run_1:cancel")   # -> CANCEL_RUN
    route.template                              # "/v1/runs/{run_id}:cancel"
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True, slots=True, eq=False)  # each route is one object: compared by identity
class Route:
    name: str
    template: str           # a bounded label for metrics, logs and access rules
    methods: frozenset[str]
    forward: bool           # sent to the coordinator, or answered by the gateway itself
    streaming: bool = False
    allow: str = ""         # the `Allow` header for a 405

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", ", ".join(sorted(self.methods)))


HEALTH = Route("health", "/v1/health", frozenset({"GET"}), forward=False)
VERSION = Route("version", "/v1/version", frozenset({"GET"}), forward=False)
LIVEZ = Route("livez", "/livez", frozenset({"GET"}), forward=False)
READYZ = Route("readyz", "/readyz", frozenset({"GET"}), forward=False)
METRICS = Route("metrics", "/metrics", frozenset({"GET"}), forward=False)
START_RUN = Route("start_run", "/v1/runs", frozenset({"POST"}), forward=True)
GET_RUN = Route("get_run", "/v1/runs/{run_id}", frozenset({"GET"}), forward=True)
CANCEL_RUN = Route("cancel_run", "/v1/runs/{run_id}:cancel", frozenset({"POST"}), forward=True)
RUN_EVENTS = Route("run_events", "/v1/runs/{run_id}/events", frozenset({"GET"}), forward=True,
                   streaming=True)
NOT_FOUND = Route("not_found", "unmatched", frozenset(), forward=False)

ALL_ROUTES = (HEALTH, VERSION, LIVEZ, READYZ, METRICS, START_RUN, GET_RUN, CANCEL_RUN, RUN_EVENTS)
_CANCEL_SUFFIX = ":cancel"
_RUNS_PREFIX = "/v1/runs/"


class RouteTable:
    def __init__(self, *, metrics_on_main: bool = False) -> None:
        static = [HEALTH, VERSION, LIVEZ, READYZ, START_RUN] + ([METRICS] if metrics_on_main else [])
        self._static = {r.template: r for r in static}

    def resolve(self, raw_path: str) -> Route | None:
        route = self._static.get(raw_path)
        if route is not None:
            return route
        if not raw_path.startswith(_RUNS_PREFIX):
            return None
        rest = raw_path[len(_RUNS_PREFIX):]
        run_id, slash, tail = rest.partition("/")
        if slash:
            return RUN_EVENTS if tail == "events" and _safe_segment(run_id) else None
        if run_id.endswith(_CANCEL_SUFFIX):
            return CANCEL_RUN if _safe_segment(run_id[: -len(_CANCEL_SUFFIX)]) else None
        return GET_RUN if _safe_segment(run_id) else None


def _safe_segment(raw: str) -> bool:
    """A run id that cannot be decoded by the coordinator into a different path."""
    if not raw:
        return False
    if "%" in raw:
        decoded = unquote(raw)
        if "/" in decoded or "\\" in decoded:
            return False
    else:
        decoded = raw
    return decoded not in (".", "..") and "\\" not in decoded
