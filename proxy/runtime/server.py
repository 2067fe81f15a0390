"""Running the gateway: listeners, signals and the Kubernetes-style drain.

On SIGTERM or SIGINT readiness turns false at once, the gateway keeps serving
for `drain_delay_s` so endpoints stop routing to it, then stops accepting,
lets in-flight requests and open streams finish for up to `shutdown_grace_s`,
closes what remains and returns. A second signal skips the drain delay.
SIGHUP runs the reload hooks (`GatewayServer.reload`): certificates are checked again and the audit file is reopened.

    asyncio.run(run_gateway(cfg))
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from ..edge.listener import EdgeLimits, Listener, default_max_connections
from ..edge.tls import HANDSHAKE_FAILURE_REASONS, CertificateFiles, ServerTls
from ..gateway.pipeline import Gateway
from ..settings.config import GatewayConfig, redacted
from ..settings.models import ListenTlsConfig
from ..util.certificates import build_context
from ..util.clock import Clock, SystemClock
from .health import CoordinatorProbe, version_info
from .ops import create_ops_app

log = logging.getLogger("proxy.runtime.server")
T = TypeVar("T")


def site_url(runner: web.AppRunner) -> str:
    """The URL a started aiohttp runner really listens on (port 0 resolved)."""
    host, port = runner.addresses[0][:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def edge_limits(cfg: GatewayConfig) -> EdgeLimits:
    return EdgeLimits(
        header_timeout_s=cfg.limits.header_timeout_s, body_timeout_s=cfg.limits.body_timeout_s,
        keepalive_timeout_s=cfg.listen.keepalive_timeout_s, max_header_bytes=cfg.limits.max_header_bytes,
        max_headers=cfg.limits.max_headers, max_body_bytes=cfg.limits.max_body_bytes,
        send_timeout_s=cfg.limits.send_timeout_s,
        max_buffered_bytes=cfg.limits.max_buffered_bytes,
        max_connections=cfg.listen.max_connections or default_max_connections(cfg.upstream.max_connections,
                                                                              cfg.limits.max_buffered_bytes))


class ReloadHooks:
    """What SIGHUP reloads, each part adding its own hook: one that fails is logged and the
    others still run, and the process goes on serving."""

    def __init__(self) -> None:
        self._hooks: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, hook: Callable[[], None]) -> None:
        self._hooks.append((name, hook))

    def run(self) -> None:
        log.info("reloading", extra={"event": "reload", "hooks": [name for name, _ in self._hooks]})
        for name, hook in self._hooks:
            try:
                hook()
            except Exception:
                log.exception("reload of %s failed", name, extra={"event": "reload_failed", "hook": name})


def server_tls(tls: ListenTlsConfig) -> CertificateFiles:
    """The public listener's certificate files, loaded now and rebuilt the same way on each change."""
    return CertificateFiles(
        "listen", tls.files,
        lambda files: build_context(files, server=True, min_version=tls.min_version, client_auth=tls.client_auth.value,
                                    session_tickets=tls.session_tickets),
        reload_interval_s=tls.reload_interval_s)


class GatewayServer:
    """A started gateway: the public listener, the optional ops listener, and their shutdown."""

    def __init__(self, gateway: Gateway, listener: Listener, ops: web.AppRunner | None) -> None:
        self.gateway = gateway
        self.listener = listener
        self._ops = ops
        self.certificates: list[CertificateFiles] = []
        self.reload = ReloadHooks()
        self.reload.add("certificates", self.reload_certificates)
        if gateway.audit is not None:
            self.reload.add("audit", gateway.audit.reopen)

    def reload_certificates(self) -> None:
        for files in self.certificates:
            files.check(force=True)

    async def cleanup(self) -> None:
        """Stops accepting, lets in-flight work finish (shutdown_grace_s), then closes everything."""
        for files in self.certificates:
            files.stop()
        await self.listener.close(self.gateway.cfg.shutdown_grace_s)
        await self.gateway.close()
        if self._ops is not None:
            await self._ops.cleanup()


async def start_gateway(cfg: GatewayConfig, *, worker: int | None = None,
                        clock: Clock | None = None) -> tuple[GatewayServer, str]:
    """Starts the public listener and, when configured, the separate ops listener.

    Workers (`worker` = 0..N-1) share the public port through SO_REUSEPORT but each gets its own
    metrics port, `metrics.port + worker`: counters live per process, and a shared port would hand
    each scrape to a random worker, so counters would jump backwards between scrapes."""
    clock = clock or SystemClock()
    probe = CoordinatorProbe(cfg.upstream, clock)
    gateway = Gateway(cfg, clock, probe, version_info())
    if gateway.upstream.certificates is not None:
        probe.ssl_context = lambda files=gateway.upstream.certificates: files.context  # the pool's, as it reloads
    await gateway.start()
    listener = Listener(gateway, edge_limits(cfg), gateway.metrics)
    if gateway.metrics is not None:
        gateway.metrics.open_connections = lambda: len(listener.connections)
        gateway.metrics.buffered_bytes = lambda: listener.budget.used
    server = GatewayServer(gateway, listener, None)
    tls = None
    if cfg.listen.tls.enabled:
        metrics = gateway.metrics
        tls = ServerTls(server_tls(cfg.listen.tls),
                        on_failure=metrics.tls_handshake_failed if metrics is not None else None)
        server.certificates.append(tls.files)
    if gateway.upstream.certificates is not None:
        server.certificates.append(gateway.upstream.certificates)
    loop = asyncio.get_running_loop()
    for files in server.certificates:
        if gateway.metrics is not None:
            gateway.metrics.tls_certificate(files.name, files.not_after,
                                            HANDSHAKE_FAILURE_REASONS if files.name == "listen" else ())
            files.on_reload = lambda result, not_after, name=files.name, metrics=gateway.metrics: \
                metrics.tls_reloaded(name, result, not_after)
        files.watch(loop)
    try:
        url = await listener.start(cfg.listen.host, cfg.listen.port, reuse_port=worker is not None, tls=tls)
        if cfg.metrics.enabled and cfg.metrics.port != 0:
            server._ops = ops = web.AppRunner(create_ops_app(gateway), access_log=None, shutdown_timeout=1)
            await ops.setup()
            await web.TCPSite(ops, cfg.metrics.host, cfg.metrics.port + (worker or 0)).start()
            gateway.ops_url = site_url(ops)
    except OSError:
        await server.cleanup()
        raise
    return server, url


async def run_gateway(cfg: GatewayConfig, *, on_ready: Callable[[str], None] | None = None,
                      worker: int | None = None) -> None:
    """Serves until a signal, then drains; the whole life of one gateway process."""
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    # Handled from the start: SIGHUP's default action would end the process.
    started: list[GatewayServer] = []

    def reload() -> None:
        for server in started:
            server.reload.run()

    loop.add_signal_handler(signal.SIGHUP, reload)
    runner, url = await start_gateway(cfg, worker=worker)
    started.append(runner)
    gateway = runner.gateway
    log.info("gateway listening", extra={"event": "start", "url": url, "metrics_url": gateway.ops_url,
                                         "pid": os.getpid(), "config": redacted(cfg)})
    if on_ready is not None:
        on_ready(url)
    try:
        received = await signals.get()
        gateway.begin_drain()
        log.info("draining", extra={"event": "drain", "signal": signal.Signals(received).name,
                                    "drain_delay_s": cfg.drain_delay_s})
        try:
            await asyncio.wait_for(signals.get(), cfg.drain_delay_s)
        except asyncio.TimeoutError:
            pass
    finally:
        log.info("stopping", extra={"event": "stop", "grace_s": cfg.shutdown_grace_s})
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped", extra={"event": "stopped"})


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Runs a coroutine on uvloop by default (libuv: more requests per core in the benchmark
    than asyncio's own loop), or on asyncio's loop when configured."""
    if event_loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def serve(cfg: GatewayConfig) -> int:
    """Runs `listen.workers` processes sharing one port (SO_REUSEPORT), each with its own caches."""
    if cfg.listen.workers == 1:
        try:
            run(run_gateway(cfg), cfg.listen.event_loop)
        except OSError as exc:
            log.error("cannot listen", extra={"event": "listen_failed", "error": str(exc)})
            return 1
        return 0
    children = []
    for worker in range(cfg.listen.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(run_gateway(cfg, worker=worker), cfg.listen.event_loop)
                code = 0
            except OSError as exc:
                log.error("cannot listen", extra={"event": "listen_failed", "error": str(exc)})
            finally:
                os._exit(code)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    sys.stdout.flush()
    return status
