"""SIGHUP: the reload hooks run in turn, one failing does not stop the others, and a gateway
with an audit file reopens it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from proxy.runtime.server import ReloadHooks, start_gateway
from tests.support.gateway import gateway_config


def test_a_failing_hook_is_logged_and_the_next_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []
    hooks = ReloadHooks()

    def broken() -> None:
        ran.append("broken")
        raise OSError("cannot reload")

    hooks.add("broken", broken)
    hooks.add("audit", lambda: ran.append("audit"))
    with caplog.at_level(logging.INFO, logger="proxy.runtime.server"):
        hooks.run()
        hooks.run()
    assert ran == ["broken", "audit"] * 2
    assert sum("reload of broken failed" in r.getMessage() for r in caplog.records) == 2


async def test_a_gateway_with_an_audit_file_reopens_it_from_its_reload_hooks(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server, _ = await start_gateway(gateway_config(None, audit={"sink": "file", "path": str(path)}))
    trail = server.gateway.audit
    assert trail is not None
    try:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, server.reload.run)   # as run_gateway installs it
        trail.record(b'{"time":"2027-01-15T08:00:00.000Z","event":"run.get","decision":"allow"}\n', ("run.get", "allow"))
        await trail.flushed()
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):            # the signal arrives through the loop's wakeup: a few iterations
            await asyncio.sleep(0)
            if trail._sink._reopen:
                break
        trail.record(b'{"time":"2027-01-15T08:00:00.000Z","event":"run.get","decision":"deny"}\n', ("run.get", "deny"))
        await trail.flushed()
        assert trail._sink.opens == 2
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await server.cleanup()
    assert len(path.read_text().splitlines()) == 2


async def test_audit_off_builds_no_trail() -> None:
    server, _ = await start_gateway(gateway_config(None))
    try:
        assert server.gateway.audit is None
    finally:
        await server.cleanup()


def test_the_listeners_session_tickets_hold_across_reloads(tmp_path: Path) -> None:
    from proxy.runtime.server import server_tls
    from proxy.settings.config import build_config
    from tests.support.certs import Pki
    pki = Pki(tmp_path / "pki")
    pair = pki.issue(pki.ca("tickets-ca"), "tickets")
    cfg = build_config({"auth": {"mode": "disabled"}, "listen": {"tls": {
        "cert_file": str(pair.cert), "key_file": str(pair.key), "session_tickets": 0}}})
    files = server_tls(cfg.listen.tls)
    assert files.context.num_tickets == 0
    assert files.check(force=True) and files.context.num_tickets == 0   # a reloaded pair keeps the setting
    default = build_config({"auth": {"mode": "disabled"}, "listen": {"tls": {
        "cert_file": str(pair.cert), "key_file": str(pair.key)}}})
    assert server_tls(default.listen.tls).context.num_tickets == 2
