"""DEV-ONLY in-memory ARP Run Coordinator (run endpoints of ARP Standard v1).

This exists so the Run Gateway can be exercised end to end (tests, local
demos) without a real coordinator. It is NOT for production:

* no persistence: every run lives in process memory and is lost on exit;
* no auth: the spec's bearer-JWT requirement is ignored, anyone may call it;
* no real execution: each run walks a fixed, simulated script of events.

Implemented: ``GET /v1/health``, ``GET /v1/version``, ``POST /v1/runs``,
``GET /v1/runs/{run_id}``, ``POST /v1/runs/{run_id}:cancel`` and
``GET /v1/runs/{run_id}/events`` (NDJSON). The ``/v1/node-runs`` endpoints of
the coordinator contract are deliberately absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

SERVICE_NAME = "arp-dev-run-coordinator"
_log = logging.getLogger(__name__)
TERMINAL_STATES = frozenset({"succeeded", "failed", "canceled"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, code: str, message: str, **details: Any) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


@dataclass
class _Run:
    body: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    # One-shot Event swapped on every change: record() stays synchronous, so a
    # state change and its event can never be interleaved with another task.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.body["state"] in TERMINAL_STATES

    def record(self, type_: str, *, state: str | None = None,
               node: bool = False, data: dict[str, Any] | None = None) -> None:
        now = _now()
        if state is not None:
            self.body["state"] = state
            if state in TERMINAL_STATES:
                self.body["ended_at"] = now
        event: dict[str, Any] = {"run_id": self.body["run_id"], "seq": len(self.events),
                                 "type": type_, "time": now}
        if node:
            event["node_run_id"] = self.body["root_node_run_id"]
        if data is not None:
            event["data"] = data
        self.events.append(event)
        self.wake()

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class _Coordinator:
    def __init__(self, step_delay_s: float, service_version: str) -> None:
        self.step_delay_s = step_delay_s
        self.service_version = service_version
        self.runs: dict[str, _Run] = {}
        self.closing = False

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "time": _now()})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"service_name": SERVICE_NAME,
                                  "service_version": self.service_version,
                                  "supported_api_versions": ["v1"]})

    async def start_run(self, request: web.Request) -> web.Response:
        try:
            req = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "invalid_request", "Request body is not valid JSON")
        # Only the checks the simulation needs; this is not a schema validator.
        if not isinstance(req, dict):
            return _error(400, "invalid_request", "Request body must be a JSON object")
        for name in ("root_node_type_ref", "input"):
            if not isinstance(req.get(name), dict):
                return _error(400, "invalid_request", f"'{name}' must be an object")
        if "run_context" in req and not isinstance(req["run_context"], dict):
            return _error(400, "invalid_request", "'run_context' must be an object")
        run_id = req.get("run_id", f"run_{uuid.uuid4().hex}")
        # A '/' would make the run unreachable through the path-based endpoints.
        if not isinstance(run_id, str) or not run_id or "/" in run_id:
            return _error(400, "invalid_request", "'run_id' must be a non-empty string without '/'")
        if run_id in self.runs:
            return _error(409, "run_exists", f"Run '{run_id}' already exists", run_id=run_id)

        body: dict[str, Any] = {"run_id": run_id, "state": "queued",
                                "root_node_run_id": f"node_run_{uuid.uuid4().hex}",
                                "started_at": _now()}
        if "run_context" in req:
            body["run_context"] = req["run_context"]
        run = self.runs[run_id] = _Run(body)
        run.task = asyncio.create_task(self._drive(run, req), name=f"devcoordinator:{run_id}")
        return web.json_response(body)

    async def _drive(self, run: _Run, req: dict[str, Any]) -> None:
        # A fixed script standing in for real node execution; the delay makes
        # the stream observably incremental.
        steps: list[tuple[str, dict[str, Any]]] = [
            ("run_started", {"state": "running"}),
            ("node_run_assigned", {"node": True,
                                   "data": {"node_type_ref": req["root_node_type_ref"]}}),
            ("atomic_executed", {"node": True, "data": {"outputs": {"echo": req["input"]}}}),
            ("node_evaluated", {"node": True, "data": {"status": "success"}}),
            ("run_completed", {"state": "succeeded", "data": {"state": "succeeded"}}),
        ]
        for type_, kwargs in steps:
            await asyncio.sleep(self.step_delay_s)
            run.record(type_, **kwargs)

    def _lookup(self, request: web.Request) -> _Run | web.Response:
        run_id = request.match_info["run_id"]
        run = self.runs.get(run_id)
        if run is None:
            return _error(404, "run_not_found", f"Run '{run_id}' not found", run_id=run_id)
        return run

    async def get_run(self, request: web.Request) -> web.Response:
        run = self._lookup(request)
        return run if isinstance(run, web.Response) else web.json_response(run.body)

    async def cancel_run(self, request: web.Request) -> web.Response:
        run = self._lookup(request)
        if isinstance(run, web.Response):
            return run
        if not run.finished:
            if run.task is not None:
                run.task.cancel()
            run.record("run_completed", state="canceled", data={"state": "canceled"})
        return web.json_response(run.body)

    async def stream_events(self, request: web.Request) -> web.StreamResponse:
        run = self._lookup(request)
        if isinstance(run, web.Response):
            return run
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        while True:
            while sent < len(run.events):
                # write() hands each line straight to the transport (and applies
                # backpressure), so followers see events as they happen.
                await resp.write(json.dumps(run.events[sent]).encode() + b"\n")
                sent += 1
            if run.finished or self.closing:
                break
            # No await between the length check above and grabbing the Event,
            # so no event can slip in unnoticed.
            await run.changed.wait()
        await resp.write_eof()
        return resp

    async def stop(self, app: web.Application) -> None:
        # Runs on shutdown too: the server waits for open streams before cleanup,
        # so they must be released first.
        self.closing = True
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for run in self.runs.values():
            run.wake()


@web.middleware
async def _error_envelopes(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp's own 404/405 are plain text; the contract wants ErrorEnvelopes.
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        resp = _error(exc.status, code, exc.reason)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except Exception:
        _log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal_error", "Internal error in dev run coordinator")


def create_app(*, step_delay_s: float = 0.25, service_version: str = "0.0.0-dev") -> web.Application:
    coord = _Coordinator(step_delay_s, service_version)
    app = web.Application(middlewares=[_error_envelopes])
    app.router.add_get("/v1/health", coord.health)
    app.router.add_get("/v1/version", coord.version)
    app.router.add_post("/v1/runs", coord.start_run)
    # run_id may contain ':' (the regex backtracks to the last ':cancel'), never '/'.
    app.router.add_post("/v1/runs/{run_id:[^/]+}:cancel", coord.cancel_run)
    app.router.add_get("/v1/runs/{run_id:[^/]+}/events", coord.stream_events)
    app.router.add_get("/v1/runs/{run_id:[^/]+}", coord.get_run)
    app.on_shutdown.append(coord.stop)
    app.on_cleanup.append(coord.stop)
    return app


async def start(host: str = "127.0.0.1", port: int = 0, *,
                step_delay_s: float = 0.25) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(step_delay_s=step_delay_s))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    netloc = f"[{host}]" if ":" in host else host
    return runner, f"http://{netloc}:{bound_port}"
