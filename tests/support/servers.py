"""Starting a purpose-built aiohttp server on an ephemeral loopback port."""

from __future__ import annotations

from aiohttp import web


async def serve_app(app: web.Application, **runner_options) -> tuple[web.AppRunner, str]:
    """Runs `app` on 127.0.0.1 port 0 and returns its runner (for cleanup) and base URL."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # no public accessor
    return runner, f"http://127.0.0.1:{port}"
