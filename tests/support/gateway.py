"""What gateway tests share: the spec location, a valid run start, a gateway configuration on a
loopback port, and one fake coordinator that records every request it receives."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.settings.config import GatewayConfig, build_config
from tests.support.servers import serve_app

SPEC = Path(__file__).resolve().parents[3] / "shared" / "arp-spec-v1"
RUN_START = {
    "root_node_type_ref": {"node_type_id": "jarvis.composite.planner.general", "version": "0.3.3"},
    "input": {"goal": "Generate a UUID, then return it."},
}


def gateway_config(upstream: str | None, /, **sections: Any) -> GatewayConfig:
    """A GatewayConfig on an ephemeral loopback port, auth disabled unless given."""
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream, "connect_timeout_s": 1, "request_timeout_s": 5,
                     "retries": {"attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}},
        "auth": {"mode": "disabled"},
        "metrics": {"enabled": False},
        "drain_delay_s": 0,
        "shutdown_grace_s": 2,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return build_config(raw)


class Upstream:
    """A purpose-built coordinator for faults and timing; records every request it receives."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.requests: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    def route(self, method: str, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        async def recorded(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.requests.append({"method": request.method, "path": request.raw_path,
                                  "headers": request.headers.copy(), "body": body})
            return await handler(request)
        self.app.router.add_route(method, path, recorded)

    async def start(self) -> str:
        self.runner, self.url = await serve_app(self.app, handler_cancellation=True)
        return self.url

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def json_response(status: int = 200, body: Any = None, **headers: str) -> web.Response:
    return web.Response(status=status, body=json.dumps(body if body is not None else {}).encode(),
                        content_type="application/json", headers=headers)
