"""What the edge holds in memory under two floods, measured on a real `arp-gateway serve` process (loopback).

    .venv/bin/python tests/bench/memory_budget.py                      # the default budget (64 MiB)
    .venv/bin/python tests/bench/memory_budget.py --source /tmp/old    # another checkout, to compare

Each flood runs against a fresh gateway. Heads: `--heads` connections each send an unfinished head of `--head-bytes`
(a request line, then one header line that never ends). Uploads: `--uploads`
authenticated run starts of about `--upload-bytes` each, all at once, behind a
coordinator that takes `--hold` seconds per run start. For each flood the
gateway's RSS is read a few seconds in (before any head or body timeout) and
reported against the RSS before it, with `arp_gateway_buffered_bytes` from its
separate metrics port when the code has it; then the statuses the uploads got.
Bounded: every wait has a timeout, every child is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.soak import GATEWAY, PYTHON, ROOT, Children, gauge, rss_bytes, wait_ready  # noqa: E402
from tests.support.process import free_port  # noqa: E402

MIB = 1024 * 1024



async def start(children: Children, workdir: Path, source: Path, hold: float) -> tuple[str, str, int, str]:
    _, issuer = await children.start([PYTHON, str(ROOT / "tests/bench/servers.py"), "issuer", "--port", "0",
                                      "--out", str(workdir), "--max-seconds", "600"], r"READY (\S+)")
    _, coordinator = await children.start([PYTHON, str(ROOT / "tests/bench/soak.py"), "_coordinator",
                                           "--latency", str(hold), "--step-delay", "0.05"], r"READY (\S+)")
    metrics_port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": 0, "event_loop": "uvloop"},
        "upstream": {"url": coordinator, "request_timeout_s": hold + 30, "max_connections": 1000,
                     "queue_timeout_s": hold + 30},
        "auth": {"mode": "required", "issuers": [{"issuer": issuer, "audiences": ["arp-run-gateway"]}]},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "logging": {"access_log": False, "level": "info"},
        "drain_delay_s": 0, "shutdown_grace_s": 2,
    }
    path = workdir / "gateway.yaml"
    path.write_text(json.dumps(config))
    proc, url = await start_in(children, [*GATEWAY, "--config", str(path)], source.resolve())
    metrics = f"http://127.0.0.1:{metrics_port}"
    await wait_ready(metrics)
    return url, metrics, proc.pid, (workdir / "token.txt").read_text().strip()


async def start_in(children: Children, args: list[str], cwd: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Children.start, but run from `cwd`, so `python -m proxy` imports that checkout."""
    import tests.bench.soak as soak
    saved = soak.ROOT
    soak.ROOT = cwd
    try:
        return await children.start(args, r'"url": "(http://[^"]+)"', stream="stdout")
    finally:
        soak.ROOT = saved


async def buffered(metrics: str) -> float:
    async with aiohttp.ClientSession() as http:
        try:
            return await asyncio.wait_for(gauge(http, metrics, "arp_gateway_buffered_bytes"), 5)
        except (aiohttp.ClientError, TimeoutError):
            return float("nan")


async def heads(url: str, metrics: str, pid: int, count: int, size: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    before = rss_bytes(pid)
    writers: list[asyncio.StreamWriter] = []
    head = b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * size
    try:
        for _ in range(count):
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
            writer.write(head)
            writers.append(writer)
        await asyncio.sleep(3)  # inside the 10 s header timeout
        during = rss_bytes(pid)
        held = await buffered(metrics)
    finally:
        for writer in writers:
            writer.transport.abort()
    await asyncio.sleep(2)
    return {"connections": len(writers), "head_bytes": size, "rss_before_mib": before / MIB,
            "rss_during_mib": during / MIB, "rss_growth_mib": (during - before) / MIB,
            "buffered_bytes_mib": held / MIB, "rss_after_mib": rss_bytes(pid) / MIB}


async def uploads(url: str, metrics: str, pid: int, token: str, count: int, size: int, hold: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    run_start = {"root_node_type_ref": {"node_type_id": "bench.node", "version": "1"},
                 "input": {"goal": "g" * (size - 120)}}
    body = json.dumps(run_start).encode()
    message = (b"POST /v1/runs HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    before = rss_bytes(pid)
    statuses: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
        except (OSError, TimeoutError):
            statuses["connect_failed"] += 1
            return
        try:
            writer.write(message)
            line = await asyncio.wait_for(reader.readline(), hold + 40)
            statuses[line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "closed"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            statuses["error"] += 1
        finally:
            writer.transport.abort()

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    await asyncio.sleep(5)  # bodies arrived or starved, inside the 10 s body timeout
    during = rss_bytes(pid)
    held = await buffered(metrics)
    await asyncio.wait(tasks, timeout=hold + 60)
    return {"uploads": count, "body_bytes": len(body), "rss_before_mib": before / MIB, "rss_during_mib": during / MIB,
            "rss_growth_mib": (during - before) / MIB, "buffered_bytes_mib": held / MIB,
            "statuses": dict(statuses), "rss_after_mib": rss_bytes(pid) / MIB}


async def main(args: argparse.Namespace) -> None:
    result: dict = {"source": str(args.source)}
    for flood in ("heads", "uploads"):  # each against a fresh gateway: RSS is not given back between them
        children = Children()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                url, metrics, pid, token = await start(children, Path(tmp), Path(args.source), args.hold)
                if flood == "heads":
                    result[flood] = await heads(url, metrics, pid, args.heads, args.head_bytes)
                else:
                    result[flood] = await uploads(url, metrics, pid, token, args.uploads, args.upload_bytes,
                                                  args.hold)
        finally:
            await children.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT), help="the checkout whose gateway runs")
    parser.add_argument("--heads", type=int, default=3500)
    parser.add_argument("--head-bytes", type=int, default=60_000)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--upload-bytes", type=int, default=1_000_000)
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the coordinator takes per run start")
    asyncio.run(main(parser.parse_args()))
