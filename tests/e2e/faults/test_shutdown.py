"""SIGTERM to a gateway process under load: 100 open event streams and 50 run starts in flight.

What a Kubernetes rollout relies on: readiness turns false at once; in-flight run
starts complete and reach their clients (no run the coordinator acknowledged is
reported as failed); open streams end within `shutdown_grace_s` after the drain
delay (the pod's grace period is computed from these two keys); new connections
are refused after the drain delay; the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
from aiohttp import web

from tests.support.gateway import RUN_START
from tests.support.process import ROOT, read_until
from tests.support.servers import serve_app

STREAMS = 100
STARTS = 50
DRAIN_S = 1.0
GRACE_S = 3.0
START_TAKES_S = 1.5      # in flight across the SIGTERM, done well within the grace period
SLACK_S = 1.0            # scheduling on a shared 2-core machine, not a tolerance for the 2x bug


class Coordinator:
    def __init__(self) -> None:
        self.acknowledged: list[str] = []
        self.starts_received = 0

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for seq in range(600):  # a run that outlives any grace period (bounded: 60 s)
            await response.write(b'{"seq": %d}\n' % seq)
            await asyncio.sleep(0.1)  # a real coordinator's pacing
        return response

    async def start_run(self, request: web.Request) -> web.Response:
        await request.read()
        self.starts_received += 1
        await asyncio.sleep(START_TAKES_S)  # a start still in flight when the signal comes
        run_id = f"run_{len(self.acknowledged)}"
        self.acknowledged.append(run_id)
        return web.json_response({"run_id": run_id, "state": "queued", "root_node_run_id": "n",
                                  "started_at": "2026-01-01T00:00:00Z"})


async def test_sigterm_with_open_streams_and_run_starts_in_flight(tmp_path):
    coordinator = Coordinator()
    app = web.Application()
    app.router.add_get("/v1/runs/{run_id}/events", coordinator.events)
    app.router.add_post("/v1/runs", coordinator.start_run)
    runner, upstream = await serve_app(app, handler_cancellation=True)
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({
        "listen": {"host": "127.0.0.1", "port": 0}, "upstream": {"url": upstream, "max_connections": 400},
        "auth": {"mode": "disabled"}, "metrics": {"enabled": False}, "logging": {"access_log": False},
        "limits": {"max_streams_per_principal": STREAMS},  # every stream comes from one anonymous address
        "drain_delay_s": DRAIN_S, "shutdown_grace_s": GRACE_S}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), cwd=ROOT,
        env={"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    loop = asyncio.get_running_loop()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30))
    streams: list[aiohttp.ClientResponse] = []
    try:
        match, _ = await read_until(proc.stdout, r'"url": "(http://127\.0\.0\.1:\d+)"', timeout=20)
        url = match.group(1)
        drain_out = asyncio.ensure_future(_drain(proc.stdout))

        for i in range(STREAMS):
            resp = await http.get(f"{url}/v1/runs/r{i}/events")
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b'{"seq": 0}')
            streams.append(resp)
        starts = [asyncio.ensure_future(_start(http, url)) for _ in range(STARTS)]
        async with asyncio.timeout(10):
            while coordinator.starts_received < STARTS:
                await asyncio.sleep(0.01)  # polls a real server

        proc.send_signal(signal.SIGTERM)
        t0 = loop.time()
        ended = [asyncio.ensure_future(_until_end(resp, loop)) for resp in streams]

        await asyncio.sleep(0.2)  # the real shutdown has begun
        async with http.get(url + "/readyz") as resp:
            assert resp.status == 503                             # readiness false at once
        assert not any(task.done() for task in ended)             # streams still flow during the drain delay

        answers = await asyncio.gather(*starts)
        assert all(status == 200 for status, _ in answers), answers
        # Every run the coordinator acknowledged reached its client as started, and nothing else did.
        assert sorted(run_id for _, run_id in answers) == sorted(coordinator.acknowledged)

        await asyncio.sleep(max(0.0, t0 + DRAIN_S + 0.3 - loop.time()))  # past the real drain delay
        async with aiohttp.ClientSession() as fresh:
            try:
                async with fresh.get(url + "/livez", timeout=aiohttp.ClientTimeout(total=2)):
                    raise AssertionError("still accepting connections after the drain delay")
            except aiohttp.ClientConnectorError:
                pass                                              # refused after the drain delay

        async with asyncio.timeout(DRAIN_S + 2 * GRACE_S + 10):
            end_times = await asyncio.gather(*ended)
            code = await proc.wait()
        exited = loop.time()
        latest = max(end_times) - (t0 + DRAIN_S)
        assert latest <= GRACE_S + SLACK_S, (
            f"streams ended {latest:.2f} s after the drain delay; shutdown_grace_s is {GRACE_S}")
        assert code == 0
        assert exited - t0 <= DRAIN_S + GRACE_S + 2 * SLACK_S
        drain_out.cancel()
    finally:
        for resp in streams:
            resp.close()
        await http.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()


async def _start(http: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with http.post(url + "/v1/runs", json=RUN_START) as resp:
        body = await resp.read()
        return resp.status, json.loads(body).get("run_id") if resp.status == 200 else None


async def _until_end(resp: aiohttp.ClientResponse, loop: asyncio.AbstractEventLoop) -> float:
    try:
        while await resp.content.readline():
            pass
    except (aiohttp.ClientError, ConnectionError):
        pass
    return loop.time()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
