"""Bounded soak and overload runs against a real `arp-gateway serve` process, all on loopback.

    .venv/bin/python tests/bench/soak.py                       # 300 s soak at 40 req/s
    .venv/bin/python tests/bench/soak.py --duration 30         # the CI version
    .venv/bin/python tests/bench/soak.py --overload            # 5x the coordinator's capacity for 20 s
    .venv/bin/python tests/bench/soak.py --json out.json       # also write the figures as JSON

Soak: a fixed-rate (open-loop) mix of run starts, gets, cancels and event
streams, 10% of them with bad tokens, through the gateway (auth required, dev
issuer) to the dev coordinator. Every answer is checked: 200 with a Run for
good calls, a complete NDJSON stream ending in `run_completed` for events, 401
for bad tokens; anything else is an unexpected answer. Reports RSS growth after
warm-up, and the gateway's open file descriptors and asyncio tasks after the
load against the baseline before it. Exit 1 when a criterion fails: any
unexpected answer, RSS growth >= 5% after warm-up, fds or tasks above baseline.

Overload: a coordinator that takes `--latency` per run start behind a pool of
`--max-connections`, so its capacity is max_connections / latency; run starts
are offered at 5x that for 20 s. Reports the shed share (503
run_coordinator_busy), the p99 of the accepted requests, and RSS before, at
peak and after. Exit 1 on any answer other than 200 or 503 run_coordinator_busy,
or when the gateway's RSS grew by more than 64 MiB.

Nothing outlives the run: every child process is stopped on exit. Tokens are
read from files and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable
GATEWAY = [PYTHON, "-m", "proxy", "serve"]
RUN_START = {"root_node_type_ref": {"node_type_id": "soak.node", "version": "1"}, "input": {"goal": "soak"}}
MIX = (("start", 0.35), ("get", 0.25), ("cancel", 0.10), ("events", 0.20), ("bad_token", 0.10))
MAX_IN_FLIGHT = 2000


# --------------------------------------------------------------------------- children


async def coordinator_main(latency: float, step_delay: float) -> None:
    """The dev coordinator, optionally slowed on run starts (the expensive call)."""
    from aiohttp import web

    from proxy.dev import coordinator as devcoordinator

    app = devcoordinator.create_app(step_delay_s=step_delay)
    if latency > 0:
        @web.middleware
        async def slow(request, handler):
            if request.method == "POST" and request.path == "/v1/runs":
                await asyncio.sleep(latency)
            return await handler(request)
        app.middlewares.insert(0, slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(f"READY http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await asyncio.wait_for(stop.wait(), 3 * 3600)
    await runner.cleanup()


class Children:
    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, args: list[str], ready: str, stream: str = "stdout") -> tuple[asyncio.subprocess.Process, str]:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        pipe = proc.stdout if stream == "stdout" else proc.stderr
        async with asyncio.timeout(60):
            while True:
                line = (await pipe.readline()).decode()
                if not line:
                    raise RuntimeError(f"{args[:4]} exited before it was ready:\n{(await proc.stderr.read()).decode()}")
                if match := re.search(ready, line):
                    break
        # Keep draining its output so a full pipe never blocks it.
        for other in (proc.stdout, proc.stderr):
            asyncio.ensure_future(_drain(other))
        return proc, match.group(1)

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                async with asyncio.timeout(40):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _drain(stream: asyncio.StreamReader | None) -> None:
    while stream is not None and await stream.read(65536):
        pass


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def gauge(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


async def wait_ready(base: str, timeout_s: float = 30) -> None:
    """Until `base`/readyz answers 200 (bounded by `timeout_s`)."""
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    async with http.get(base + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)  # polls a child process starting


async def start_stack(children: Children, workdir: Path, *, latency: float, step_delay: float,
                      upstream: dict, limits: dict | None = None) -> tuple[str, int, str, str]:
    _, issuer = await children.start([PYTHON, str(ROOT / "tests/bench/servers.py"), "issuer", "--port", "0",
                                      "--out", str(workdir), "--max-seconds", "10800"], r"READY (\S+)")
    _, coordinator = await children.start([PYTHON, __file__, "_coordinator", "--latency", str(latency),
                                           "--step-delay", str(step_delay)], r"READY (\S+)")
    config = {
        "listen": {"host": "127.0.0.1", "port": 0, "event_loop": "uvloop"},
        "upstream": {"url": coordinator, **upstream},
        "limits": limits or {},
        "auth": {"mode": "required", "issuers": [{"issuer": issuer, "audiences": ["arp-run-gateway"]}]},
        "metrics": {"enabled": True, "port": 0},
        "logging": {"access_log": False, "level": "info"},
        "drain_delay_s": 0, "shutdown_grace_s": 5,
    }
    path = workdir / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    proc, url = await children.start([*GATEWAY, "--config", str(path)], r'"url": "(http://[^"]+)"')
    await wait_ready(url)  # listening is not ready: /readyz says when the JWKS is loaded
    token = (workdir / "token.txt").read_text().strip()
    bad = (workdir / "wrong-aud.txt").read_text().strip()
    return url, proc.pid, token, bad


# --------------------------------------------------------------------------- soak


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.unexpected: dict[str, int] = {}
        self.latencies: dict[str, list[float]] = {}

    def ok(self, kind: str, seconds: float) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.latencies.setdefault(kind, []).append(seconds)

    def bad(self, kind: str, what: str) -> None:
        key = f"{kind}: {what}"
        self.unexpected[key] = self.unexpected.get(key, 0) + 1


async def one(http: aiohttp.ClientSession, url: str, kind: str, token: str, bad: str, runs: list[str],
              tally: Tally) -> None:
    auth = {"Authorization": f"Bearer {bad if kind == 'bad_token' else token}"}
    started = time.perf_counter()
    try:
        if kind in ("start", "bad_token"):
            async with http.post(url + "/v1/runs", json=RUN_START, headers=auth) as resp:
                body = await resp.read()
                if kind == "bad_token":
                    if resp.status != 401:
                        return tally.bad(kind, str(resp.status))
                else:
                    if resp.status != 200:
                        return tally.bad(kind, f"{resp.status} {body[:120]!r}")
                    runs.append(json.loads(body)["run_id"])
                    if len(runs) > 2000:
                        del runs[:1000]
        elif kind in ("get", "cancel"):
            run_id = random.choice(runs)
            method, path = ("GET", f"/v1/runs/{run_id}") if kind == "get" else ("POST", f"/v1/runs/{run_id}:cancel")
            async with http.request(method, url + path, headers=auth) as resp:
                body = await resp.read()
                if resp.status != 200 or json.loads(body).get("run_id") != run_id:
                    return tally.bad(kind, f"{resp.status} {body[:120]!r}")
        else:
            run_id = random.choice(runs)
            async with http.get(f"{url}/v1/runs/{run_id}/events", headers=auth) as resp:
                if resp.status != 200:
                    return tally.bad(kind, str(resp.status))
                lines = [json.loads(line) async for line in resp.content if line.strip()]
            # Nothing lost: every event from 0 to the terminal one, in order.
            if [e["seq"] for e in lines] != list(range(len(lines))) or lines[-1]["type"] != "run_completed":
                return tally.bad(kind, "incomplete stream")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return tally.bad(kind, type(exc).__name__)
    tally.ok(kind, time.perf_counter() - started)


async def open_loop(rate: float, duration: float, launch) -> int:
    """Launches `launch()` at a fixed rate regardless of how fast answers come (no coordinated omission)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task] = set()
    overruns = 0
    i = 0
    while True:
        at = start + i / rate
        if at - start >= duration:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= MAX_IN_FLIGHT:
            overruns += 1
        else:
            task = asyncio.ensure_future(launch())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    return overruns


def pick() -> str:
    r = random.random()
    for kind, share in MIX:
        if r < share:
            return kind
        r -= share
    return MIX[-1][0]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def soak(args: argparse.Namespace) -> dict:
    children = Children()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        try:
            # One token drives the whole mix: its streams are not capped per principal here.
            url, pid, token, bad = await start_stack(children, Path(tmp), latency=0, step_delay=0.02,
                                                     upstream={"max_connections": 200},
                                                     limits={"max_streams_per_principal": 256})
            tally = Tally()
            runs: list[str] = []
            connector = aiohttp.TCPConnector(limit=256)
            async with aiohttp.ClientSession(connector=connector) as http:
                for _ in range(5):
                    await one(http, url, "start", token, bad, runs, tally)
                fds0, tasks0 = fd_count(pid), await gauge(http, url, "arp_gateway_asyncio_tasks")
                warmup = max(5.0, args.duration * 0.2)
                samples: list[tuple[float, int]] = []
                sampler_stop = asyncio.Event()

                async def sample() -> None:
                    t0 = time.monotonic()
                    while not sampler_stop.is_set():
                        samples.append((time.monotonic() - t0, rss_bytes(pid)))
                        try:
                            await asyncio.wait_for(sampler_stop.wait(), 1.0)
                        except TimeoutError:
                            pass

                sampler = asyncio.ensure_future(sample())
                overruns = await open_loop(args.rate, args.duration,
                                           lambda: one(http, url, pick(), token, bad, runs, tally))
                sampler_stop.set()
                await sampler
            await asyncio.sleep(2)  # the gateway closes its side of the client's kept-alive connections
            async with aiohttp.ClientSession() as probe:
                tasks1 = await gauge(probe, url, "arp_gateway_asyncio_tasks")
            fds1 = fd_count(pid)
            after_warmup = [rss for t, rss in samples if t >= warmup]
            rss_warm = after_warmup[0] if after_warmup else samples[-1][1]
            rss_end = samples[-1][1]
            total = sum(tally.counts.values()) + sum(tally.unexpected.values())
            result = {
                "mode": "soak", "duration_s": args.duration, "rate_per_s": args.rate, "requests": total,
                "answers": tally.counts, "unexpected": tally.unexpected, "client_overruns": overruns,
                "p99_ms": {k: round(percentile(v, 99) * 1000, 1) for k, v in tally.latencies.items()},
                "rss_after_warmup_mib": round(rss_warm / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
                "rss_growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
                "fds_baseline": fds0, "fds_after": fds1, "tasks_baseline": tasks0, "tasks_after": tasks1,
            }
            result["ok"] = (not tally.unexpected and result["rss_growth_pct"] < 5 and fds1 <= fds0
                            and tasks1 <= tasks0 and overruns == 0)
            return result
        finally:
            await children.stop()


# --------------------------------------------------------------------------- overload


async def overload(args: argparse.Namespace) -> dict:
    children = Children()
    capacity = args.max_connections / args.latency
    offered = 5 * capacity
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        try:
            url, pid, token, _ = await start_stack(
                children, Path(tmp), latency=args.latency, step_delay=0.05,
                upstream={"max_connections": args.max_connections, "queue_timeout_s": args.queue_timeout,
                          "request_timeout_s": 10})
            rss0 = rss_bytes(pid)
            peak = rss0
            statuses: dict[str, int] = {}
            accepted: list[float] = []
            auth = {"Authorization": f"Bearer {token}"}

            async def start_run(http: aiohttp.ClientSession) -> None:
                started = time.perf_counter()
                try:
                    async with http.post(url + "/v1/runs", json=RUN_START, headers=auth) as resp:
                        body = await resp.read()
                        key = str(resp.status)
                        if resp.status == 503:
                            key += " " + json.loads(body)["error"]["code"]
                        elif resp.status == 200:
                            accepted.append(time.perf_counter() - started)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                stop = asyncio.Event()

                async def watch() -> None:
                    nonlocal peak
                    while not stop.is_set():
                        peak = max(peak, rss_bytes(pid))
                        await asyncio.sleep(0.25)

                watcher = asyncio.ensure_future(watch())
                overruns = await open_loop(offered, args.overload_seconds, lambda: start_run(http))
                stop.set()
                await watcher
            await asyncio.sleep(2)
            rss1 = rss_bytes(pid)
            total = sum(statuses.values())
            shed = statuses.get("503 run_coordinator_busy", 0) + statuses.get("429", 0)
            result = {
                "mode": "overload", "coordinator_capacity_per_s": capacity, "offered_per_s": offered,
                "seconds": args.overload_seconds, "requests": total, "answers": statuses,
                "client_overruns": overruns,
                "shed_pct": round(100 * shed / total, 1) if total else 0.0,
                "accepted_per_s": round(len(accepted) / args.overload_seconds, 1),
                "accepted_p50_ms": round(percentile(accepted, 50) * 1000, 1),
                "accepted_p99_ms": round(percentile(accepted, 99) * 1000, 1),
                "rss_before_mib": round(rss0 / 2**20, 1), "rss_peak_mib": round(peak / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
            }
            unexpected = {k: v for k, v in statuses.items() if k not in ("200", "503 run_coordinator_busy", "429")}
            result["unexpected"] = unexpected
            result["ok"] = not unexpected and peak - rss0 < 64 * 2**20
            return result
        finally:
            await children.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_coordinator":
        p = argparse.ArgumentParser()
        p.add_argument("_coordinator")
        p.add_argument("--latency", type=float, default=0.0)
        p.add_argument("--step-delay", type=float, default=0.02)
        a = p.parse_args()
        asyncio.run(coordinator_main(a.latency, a.step_delay))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="soak seconds (default 300)")
    p.add_argument("--rate", type=float, default=40.0, help="soak requests per second (default 40)")
    p.add_argument("--overload", action="store_true", help="run the overload measurement instead")
    p.add_argument("--overload-seconds", type=float, default=20.0)
    p.add_argument("--latency", type=float, default=0.1, help="overload: coordinator seconds per run start")
    p.add_argument("--max-connections", type=int, default=8, help="overload: upstream.max_connections")
    p.add_argument("--queue-timeout", type=float, default=1.0, help="overload: upstream.queue_timeout_s")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.duration <= 0 or args.duration > 3600 or args.rate <= 0 or args.rate > 2000:
        p.error("--duration must be in (0, 3600] and --rate in (0, 2000]")
    result = asyncio.run(overload(args) if args.overload else soak(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
