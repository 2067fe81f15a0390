"""`arp-gateway serve` over HTTPS as a process (uvloop, the production loop): the seed flow with
`curl --cacert`, the ARP conformance surface, and a certificate swapped in by SIGHUP."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from proxy.dev import coordinator as devcoordinator
from tests.e2e.tls.conftest import Certs
from tests.e2e.tls.test_listener import client_context, served_name
from tests.support.certs import install
from tests.support.conformance import run_conformance
from tests.support.gateway import RUN_START
from tests.support.process import serve_process


@pytest.fixture
async def dev_coordinator() -> AsyncIterator[str]:
    runner, url = await devcoordinator.start(step_delay_s=0.01)
    yield url
    await runner.cleanup()


async def curl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "10", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, (out or err).decode()


async def test_seed_flow_conformance_and_sighup_over_https(tmp_path: Path, certs: Certs, dev_coordinator: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    live = tmp_path / "live"
    install(certs.server1, live)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0,
                   "tls": {"cert_file": str(live / "tls.crt"), "key_file": str(live / "tls.key"),
                           "reload_interval_s": 3600}},
        "upstream": {"url": dev_coordinator},
        "auth": {"mode": "disabled"},
        "metrics": {"enabled": False},
        "drain_delay_s": 0,
    }))
    async with serve_process(config) as gateway:
        url = gateway.url
        assert url.startswith("https://127.0.0.1:")
        cacert = ("--cacert", str(certs.ca.cert))
        # Plain curl without the CA refuses the certificate; with it, the seed flow works.
        code, _ = await curl(url + "/v1/health")
        assert code != 0
        code, body = await curl(*cacert, "-X", "POST", url + "/v1/runs", "-H", "Content-Type: application/json",
                                "-d", json.dumps(RUN_START))
        assert code == 0, body
        run = json.loads(body)
        code, body = await curl(*cacert, f"{url}/v1/runs/{run['run_id']}/events")
        assert code == 0, body
        events = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert events[-1]["type"] == "run_completed"

        monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca.cert))   # httpx, inside the conformance runner
        result = await run_conformance(url, tier="surface")
        assert result.ok, result.summary()

        port = gateway.address[1]
        context = client_context(certs)
        assert await served_name(port, context) == "server1"
        install(certs.server2, live)
        gateway.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await served_name(port, context) == "server2":
                break
            await asyncio.sleep(0.05)
        assert await served_name(port, context) == "server2"
        assert gateway.proc.returncode is None
        assert any(e.get("event") == "tls_reloaded" for _, e in gateway.logs)
