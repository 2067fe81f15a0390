"""The ops listener: `/metrics`, `/livez`, `/readyz` and `/readyz/coordinator`, on their own port.

The public port never exposes metrics or probes of the coordinator. In a pod
the coordinator listens on 127.0.0.1 only, so the kubelet cannot probe it;
its `readinessProbe` targets `/readyz/coordinator` here instead, and the
gateway asks the coordinator's `GET /v1/health` over loopback (cached for a
second, single-flight: see `health.CoordinatorProbe`).

    app = create_ops_app(gateway)      # served by server.start_gateway
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from ..arp.routes import LIVEZ, METRICS, READYZ, Route

if TYPE_CHECKING:
    from ..gateway.pipeline import Gateway

COORDINATOR_READYZ = "/readyz/coordinator"
_LOCAL_ROUTES = {"/metrics": METRICS, "/livez": LIVEZ, "/readyz": READYZ}
_JSON = "application/json"


async def coordinator_readiness(gateway: Gateway) -> tuple[int, dict[str, object]]:
    """200 when the coordinator answered its health check with HTTP 200 and `ok` or `degraded`."""
    ready, check = await gateway.probe.ready()
    return (200 if ready else 503), {"status": "ready" if ready else "not_ready", "checks": [check]}


def create_ops_app(gateway: Gateway) -> web.Application:
    async def ops(request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return web.Response(status=404, text="not found\n")
        if request.path == COORDINATOR_READYZ:
            status, body = await coordinator_readiness(gateway)
            return web.Response(status=status, body=json.dumps(body).encode(), content_type=_JSON)
        route = _LOCAL_ROUTES.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found\n")
        return _local(gateway, route)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ops)
    return app


def _local(gateway: Gateway, route: Route) -> web.Response:
    """The one call into the gateway's own answers (metrics, livez, readyz): a gateway-made
    `Answer` turned into an aiohttp response here and nowhere else."""
    answer = gateway.probe_answer(route)
    return web.Response(status=answer.status, body=answer.body,
                        headers={"Content-Type": answer.content_type.decode()})
