"""A gateway process with `audit.sink: file` (issue 18): it starts with the file open, writes
nothing for routes that are not run routes, keeps serving through SIGHUP (whose default would end
it) by reopening the file, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import yaml

from tests.support.process import serve_process


async def test_a_gateway_with_an_audit_file_survives_sighup_and_writes_nothing_for_other_routes(
        tmp_path: Path) -> None:
    audit_file = tmp_path / "audit" / "audit.log"
    audit_file.parent.mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0, "event_loop": "asyncio"},
        "auth": {"mode": "disabled"}, "metrics": {"enabled": False},
        "drain_delay_s": 0, "shutdown_grace_s": 2,
        "audit": {"sink": "file", "path": str(audit_file)},
    }))
    async with serve_process(config) as gw, aiohttp.ClientSession() as http:
        assert audit_file.exists()   # opened at start: an unwritable path shows at once
        for path, status in (("/v1/version", 200), ("/livez", 200), ("/readyz", 200), ("/nope", 404)):
            async with http.get(gw.url + path) as resp:
                assert resp.status == status
        gw.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while not any(e.get("event") == "reload" for _, e in gw.logs):
                assert gw.proc.returncode is None, "SIGHUP ended the gateway"
                await asyncio.sleep(0.05)   # the child handling its signal
        reload = next(e for _, e in gw.logs if e.get("event") == "reload")
        assert reload["hooks"] == ["audit"]
        async with http.get(gw.url + "/livez") as resp:
            assert resp.status == 200
        gw.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await gw.proc.wait() == 0
    assert audit_file.read_text() == ""
