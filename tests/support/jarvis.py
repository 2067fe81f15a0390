"""The real JARVIS Run Coordinator 0.3.8 on loopback, with its Run Store and Event Stream.

Three processes (PyPI arp-jarvis-run-coordinator, -runstore, -eventstream), each on a free port
with its SQLite file in a temporary folder. The stores run with inbound auth disabled; the
coordinator verifies nothing inbound either and takes its outbound client-credentials tokens from
the test IdP's token endpoint. No executor is configured and dispatch is off, so a started run
stays `running` until it is canceled: what a test sees is what the coordinator stored.

    async with JarvisStack(tmp_path, token_endpoint=idp.issuer + "/token") as jarvis:
        jarvis.url                                  # the coordinator, for upstream.url
        await jarvis.stored_run(run_id)             # the Run as the Run Store holds it
        await jarvis.stored_events(run_id)          # its events as the Event Stream holds them
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.process import free_ports

_STORE_ENV = {"ARP_AUTH_MODE": "disabled"}


class JarvisStack:
    def __init__(self, folder: Path, *, token_endpoint: str) -> None:
        self.folder = folder
        self.token_endpoint = token_endpoint
        self.procs: list[asyncio.subprocess.Process] = []
        store_port, events_port, coordinator_port = free_ports(3)
        self.store_url = f"http://127.0.0.1:{store_port}"
        self.events_url = f"http://127.0.0.1:{events_port}"
        self.url = f"http://127.0.0.1:{coordinator_port}"
        self._ports = (store_port, events_port, coordinator_port)

    async def __aenter__(self) -> JarvisStack:
        store_port, events_port, coordinator_port = self._ports
        try:
            await self._spawn("jarvis_run_store", store_port, {
                **_STORE_ENV, "JARVIS_RUN_STORE_DB_URL": f"sqlite:///{self.folder}/runs.sqlite"})
            await self._spawn("jarvis_event_stream", events_port, {
                **_STORE_ENV, "JARVIS_EVENT_STORE_DB_URL": f"sqlite:///{self.folder}/events.sqlite"})
            await self._spawn("jarvis_run_coordinator", coordinator_port, {
                "ARP_AUTH_MODE": "disabled",
                "ARP_AUTH_CLIENT_ID": "jarvis-run-coordinator", "ARP_AUTH_CLIENT_SECRET": "test-secret",
                "ARP_AUTH_TOKEN_ENDPOINT": self.token_endpoint,
                "JARVIS_RUN_STORE_URL": self.store_url, "JARVIS_EVENT_STREAM_URL": self.events_url,
                # Required at start-up; nothing in these tests stores an artifact.
                "JARVIS_ARTIFACT_STORE_URL": "http://127.0.0.1:9",
                "JARVIS_POLICY_PROFILE": "dev-allow", "JARVIS_RUN_COORDINATOR_AUTO_DISPATCH": "false"})
            for url in (self.store_url, self.events_url, self.url):
                await _wait_healthy(url)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _spawn(self, module: str, port: int, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ARP_", "JARVIS_"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port),
            env={**base, "LOG_LEVEL": "WARNING", **env}, cwd=str(self.folder),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.procs.append(proc)

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs.clear()

    async def stored_run(self, run_id: str) -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as s, s.get(f"{self.store_url}/v1/runs/{run_id}") as r:
            if r.status == 404:
                return None
            assert r.status == 200, await r.text()
            return (await r.json())["run"]

    async def stored_events(self, run_id: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.events_url}/v1/runs/{run_id}/events") as r:
            assert r.status == 200, await r.text()
            return [json.loads(line) for line in (await r.text()).splitlines() if line.strip()]


async def _wait_healthy(url: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"{url}/v1/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{url} did not become healthy within {timeout:g} s")
            await asyncio.sleep(0.2)
