"""The gateway as a process: `arp-gateway dev` and the seed's curl flow, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp

from proxy.dev import coordinator as devcoordinator
from tests.support.gateway import RUN_START
from tests.support.process import ROOT, free_ports, read_until

ENV = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}


async def spawn(*args: str, env: dict | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, env={**ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        return await proc.wait()


async def test_dev_runs_the_seed_flow_with_and_without_a_token(http):
    proc = await spawn("dev", "--port", "0", "--issuer-port", "0", "--metrics-port", "0", "--step-delay", "0.05")
    try:
        _, banner = await read_until(proc.stderr, r"Ctrl-C to stop")
        match = re.search(r"Dev token issuer\s+(http://127\.0\.0\.1:\d+)", banner)
        gateway = re.search(r"ARP Run Gateway \(dev\)\s+(http://127\.0\.0\.1:\d+)", banner).group(1)
        assert "Dev Run Coordinator" in banner and "curl -sS -X POST" in banner
        issuer = match.group(1)

        # Seed step 3: no auth.
        async with http.post(gateway + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 200
            run = await resp.json()
        assert run["run_id"] and run["root_node_run_id"]

        # Seed step 4: TOKEN="$(arp-gateway token)".
        minted = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "token", "--issuer", issuer, cwd=ROOT, env=ENV,
            stdout=asyncio.subprocess.PIPE)
        token = (await minted.communicate())[0].decode().strip()
        assert minted.returncode == 0 and token.count(".") == 2
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(gateway + "/v1/runs", json=RUN_START, headers=headers) as resp:
            assert resp.status == 200
            run = await resp.json()
        # A forged token is still refused in the default optional mode.
        async with http.post(gateway + "/v1/runs", json=RUN_START,
                             headers={"Authorization": f"Bearer {token[:-4]}AAAA"}) as resp:
            assert resp.status == 401

        # The run's events stream as NDJSON, line by line, ending with run_completed.
        async with http.get(f"{gateway}/v1/runs/{run['run_id']}/events") as resp:
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            events = [json.loads(line) async for line in resp.content]
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "run_completed"
    finally:
        assert await stop(proc) == 0


async def test_dev_auth_required_refuses_the_no_token_curl(http):
    proc = await spawn("dev", "--port", "0", "--issuer-port", "0", "--metrics-port", "0", "--auth", "required")
    try:
        match, _ = await read_until(proc.stderr, r"ARP Run Gateway \(dev\)\s+(http://127\.0\.0\.1:\d+)")
        async with http.post(match.group(1) + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer realm=")
    finally:
        assert await stop(proc) == 0


async def test_dev_runs_owner_shows_the_second_subjects_404_on_the_first_ones_run(http):
    proc = await spawn("dev", "--port", "0", "--issuer-port", "0", "--metrics-port", "0", "--runs", "owner")
    try:
        _, banner = await read_until(proc.stderr, r"Ctrl-C to stop")
        gateway = re.search(r"ARP Run Gateway \(dev\)\s+(http://127\.0\.0\.1:\d+)", banner).group(1)
        issuer = re.search(r"Dev token issuer\s+(http://127\.0\.0\.1:\d+)", banner).group(1)
        assert 'arp-gateway token --sub alice' in banner and 'arp-gateway token --sub bob' in banner

        async def token(sub: str) -> str:
            minted = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "token", "--sub", sub, "--issuer", issuer, cwd=ROOT, env=ENV,
                stdout=asyncio.subprocess.PIPE)
            return (await minted.communicate())[0].decode().strip()

        alice, bob = {"Authorization": f"Bearer {await token('alice')}"}, {"Authorization": f"Bearer {await token('bob')}"}
        async with http.post(gateway + "/v1/runs", json=RUN_START, headers=alice) as resp:
            assert resp.status == 200
            run = await resp.json()
        # The dev coordinator keeps run_context as a real one does: the run names alice.
        assert run["run_context"]["identity"]["sub"] == "alice"
        assert run["run_context"]["actor"] == {"type": "principal", "id": "alice"}
        async with http.get(f"{gateway}/v1/runs/{run['run_id']}", headers=alice) as resp:
            assert resp.status == 200 and (await resp.json())["run_context"]["identity"]["sub"] == "alice"
        async with http.get(f"{gateway}/v1/runs/{run['run_id']}", headers=bob) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "run_not_found"
        async with http.post(f"{gateway}/v1/runs/{run['run_id']}:cancel", headers=bob) as resp:
            assert resp.status == 404
    finally:
        assert await stop(proc) == 0


async def test_sigterm_drains_readiness_then_lets_streams_finish(tmp_path, http):
    runner, coordinator = await devcoordinator.start(step_delay_s=0.5)   # a run lasts ~2.5 s
    config = tmp_path / "g.yaml"
    config.write_text(f"listen: {{host: 127.0.0.1, port: 0}}\nupstream: {{url: '{coordinator}'}}\n"
                      "auth: {mode: disabled}\nmetrics: {enabled: false}\n"
                      "drain_delay_s: 0.5\nshutdown_grace_s: 10\n")
    proc = await spawn("serve", "--config", str(config))
    try:
        match, _ = await read_until(proc.stdout, r'"url": "(http://127\.0\.0\.1:\d+)"')
        url = match.group(1)
        async with http.post(url + "/v1/runs", json=RUN_START) as resp:
            run = await resp.json()
        stream = await http.get(f"{url}/v1/runs/{run['run_id']}/events")
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)  # the child process handles SIGTERM
        async with http.get(url + "/readyz") as resp:
            assert resp.status == 503                     # readiness turns false at once
        async with http.get(url + "/livez") as resp:
            assert resp.status == 200                     # but it serves on for drain_delay_s
        await asyncio.sleep(0.8)  # past the child's real drain_delay_s
        async with aiohttp.ClientSession() as fresh:      # past the delay: no new connections
            try:
                async with fresh.get(url + "/livez", timeout=aiohttp.ClientTimeout(total=2)):
                    raise AssertionError("still accepting connections after the drain delay")
            except aiohttp.ClientConnectorError:
                pass
        lines = [json.loads(line) async for line in stream.content]
        assert lines[-1]["type"] == "run_completed"      # the open stream still finished cleanly
        async with asyncio.timeout(15):
            assert await proc.wait() == 0                # then it exits by itself, cleanly
    finally:
        await stop(proc)
        await runner.cleanup()


async def start_two_workers(tmp_path: Path, coordinator: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """Two workers on free ports. A port found free can be taken by another process before the
    workers bind it (the machine is shared): a start that fails to listen is retried on new ports."""
    for _ in range(3):
        port, metrics = free_ports(2)
        if port == metrics + 1:
            metrics += 2
        config = tmp_path / "g.yaml"
        config.write_text(f"listen: {{host: 127.0.0.1, port: {port}, workers: 2}}\nupstream: {{url: '{coordinator}'}}\n"
                          f"auth: {{mode: disabled}}\nmetrics: {{host: 127.0.0.1, port: {metrics}}}\n"
                          "drain_delay_s: 0\nshutdown_grace_s: 5\n")
        proc = await spawn("serve", "--config", str(config))
        # Each worker says it listens or that it cannot (its metrics port, metrics + worker, is not
        # reserved and may be taken meanwhile); wait for both answers, then retry on new ports if
        # either could not listen.
        seen = ""
        try:
            while len(re.findall(r'"metrics_url": "http|"cannot listen"', seen)) < 2:
                _, read = await read_until(proc.stdout, r'"metrics_url": "http|"cannot listen"', timeout=40)
                seen += read
        except AssertionError:
            await stop(proc)
            raise
        if '"cannot listen"' in seen:
            await stop(proc)
            continue
        pids = set(re.findall(r'"metrics_url": "http://127\.0\.0\.1:\d+".*?"pid": (\d+)', seen))
        assert len(pids) == 2, seen
        return proc, port, metrics
    raise AssertionError("no two free ports could be bound in three tries")


async def test_workers_share_the_port_and_each_has_its_metrics_port(tmp_path, coordinator, http):
    proc, port, metrics = await start_two_workers(tmp_path, coordinator)
    try:
        for _ in range(20):
            async with http.post(f"http://127.0.0.1:{port}/v1/runs", json=RUN_START) as resp:
                assert resp.status == 200
        served = 0
        for worker in range(2):
            async with http.get(f"http://127.0.0.1:{metrics + worker}/metrics") as resp:
                text = await resp.text()
            served += sum(float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith('arp_gateway_requests_total{code="200",method="POST"'))
        assert served == 20                          # every request counted once, by the worker that served it
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        await stop(proc)
