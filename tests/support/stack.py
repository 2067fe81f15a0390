"""A whole stack on loopback in a background thread: dev issuer, recording dev coordinator, gateway.

For tests whose drivers are synchronous (schemathesis, hypothesis over raw
HTTP): the gateway needs a running event loop while the test blocks, so the
stack gets its own loop in its own thread. Every request the coordinator
receives is recorded, so a test can prove what was (not) forwarded.

    with ThreadedStack(auth="required") as stack:
        token = stack.token()
        status, headers, body = stack.request("GET", "/v1/runs/x", headers={"Authorization": ...})
        stack.forwarded                    # [(method, raw_path, body, request_id), ...]
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from typing import Any

from aiohttp import web

from proxy.dev import coordinator as devcoordinator
from proxy.dev import issuer as devissuer
from proxy.settings.config import build_config
from proxy.runtime.server import start_gateway

AUDIENCE = "arp-run-gateway"


class ThreadedStack:
    def __init__(self, *, auth: str = "required", **sections: Any) -> None:
        self.auth_mode = auth
        self.sections = sections
        self.forwarded: list[tuple[str, str, bytes, str]] = []  # method, raw path, body, X-Request-ID
        self.url = ""
        self.coordinator_url = ""
        self.issuer: devissuer.DevIssuer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> ThreadedStack:
        self._thread = threading.Thread(target=self._run, name="stack", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"stack did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runners: list[Any] = []
        try:
            issuer_runner, self.issuer = await devissuer.start(port=0)
            runners.append(issuer_runner)
            app = devcoordinator.create_app(step_delay_s=0.01)

            @web.middleware
            async def record(request: web.Request, handler):
                body = await request.read()
                self.forwarded.append((request.method, request.raw_path, body,
                                       request.headers.get("X-Request-ID", "")))
                return await handler(request)

            app.middlewares.insert(0, record)
            coordinator = web.AppRunner(app, access_log=None)
            await coordinator.setup()
            site = web.TCPSite(coordinator, "127.0.0.1", 0)
            await site.start()
            runners.append(coordinator)
            self.coordinator_url = f"http://127.0.0.1:{coordinator.addresses[0][1]}"
            raw: dict[str, Any] = {
                "listen": {"host": "127.0.0.1", "port": 0},
                "upstream": {"url": self.coordinator_url, "connect_timeout_s": 1, "request_timeout_s": 5},
                "auth": {"mode": self.auth_mode,
                         "issuers": [{"issuer": self.issuer.url, "audiences": [AUDIENCE]}]},
                "metrics": {"enabled": False},
                "logging": {"access_log": False},
                "drain_delay_s": 0,
                "shutdown_grace_s": 1,
            }
            for key, value in self.sections.items():
                raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
            server, self.url = await start_gateway(build_config(raw))
            runners.append(server)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()

    # ------------------------------------------------------------------ test side (any thread)

    def seen(self, request_id: str) -> list[tuple[str, str, bytes, str]]:
        """What the coordinator received for the request that carried this X-Request-ID."""
        return [entry for entry in list(self.forwarded) if entry[3] == request_id]

    def token(self, **claims: Any) -> str:
        assert self.issuer is not None
        return self.issuer.mint(**{"sub": "prop-tester", "aud": AUDIENCE, **claims})

    def request(self, method: str, target: str, *, body: bytes | None = None,
                headers: dict[str, str] | list[tuple[str, str]] | None = None,
                timeout: float = 10) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request with the target sent byte for byte (no normalisation), on a new connection."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            pairs = headers.items() if isinstance(headers, dict) else (headers or [])
            for name, value in pairs:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()
