"""Load clients that wrk cannot be: bench.py runs each as a CPU-pinned process and reads its JSON.

    python tests/bench/clients.py openloop --url URL --token-file F --rate 1000 --count 5000
    python tests/bench/clients.py lines    --url URL/v1/runs/tick-200-10/events --token-file F
    python tests/bench/clients.py streams  --base URL --token-file F --count 1000 --hold 3

Each prints exactly one JSON object on stdout. Everything is bounded by
--max-seconds; nothing retries forever.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time
from urllib.parse import urlsplit

RUN_START_BODY = b'{"root_node_type_ref": {"node_type_id": "bench", "version": "1"}, "input": {}}'


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (what wrk and HdrHistogram report), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(pct / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def _hostport(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


# --------------------------------------------------------------------------- open loop
#
# wrk is closed-loop: each connection waits for its answer before sending again,
# so a slow server gets fewer requests and its latency looks better than a user
# would see it. Here requests are due on a fixed schedule whatever the server
# does: each goes out on an idle keep-alive connection, or a new one, up to
# --max-connections; past that it waits in a queue for the next free one.
#
# Latency runs from the moment the request was sent, or, for a request that had
# to queue for a connection, from the moment it was due: a target that falls
# behind the rate pays for its backlog (no coordinated omission), while the
# client's own timer slack (asyncio wakes up to ~1 ms late) is not charged to
# the target. The client is a bare asyncio protocol so its own cost per request
# stays in the tens of microseconds.


class _Conn(asyncio.Protocol):
    def __init__(self, on_done) -> None:
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.started = 0.0
        self.busy = False
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.busy:
            self.busy = False
            self.on_done(self, None, None)

    def send(self, data: bytes, started: float) -> None:
        self.busy = True
        self.started = started
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self._complete()
        if end is None:
            return
        status = int(self.buf[9:12])
        del self.buf[:end]
        self.busy = False
        self.on_done(self, status, time.perf_counter() - self.started)

    def _complete(self) -> int | None:
        """Offset just past a complete response in buf, or None (Content-Length or chunked)."""
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        body = head_end + 4
        length, chunked = None, False
        for line in bytes(self.buf[:head_end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length is not None:
            return body + length if len(self.buf) >= body + length else None
        if chunked:
            term = self.buf.find(b"0\r\n\r\n", body)
            return term + 5 if term >= 0 else None
        return body


async def openloop(args: argparse.Namespace) -> dict:
    host, port, path = _hostport(args.url)
    token = open(args.token_file).read().strip()
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(RUN_START_BODY)}\r\n\r\n"
               ).encode() + RUN_START_BODY
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    conns: list[_Conn] = []
    backlog: collections.deque[float] = collections.deque()   # due times waiting for a connection
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    st = {"recording": False, "in_flight": 0, "errors": 0, "queued": 0, "all_sent": False}
    finished = asyncio.Event()

    def on_done(conn: _Conn, status: int | None, latency: float | None) -> None:
        st["in_flight"] -= 1
        if status is None:
            st["errors"] += 1
        elif st["recording"]:
            latencies.append(latency)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        if not conn.lost:
            if backlog:
                st["in_flight"] += 1
                conn.send(request, backlog.popleft())
            else:
                idle.append(conn)
        if st["all_sent"] and st["in_flight"] == 0 and not backlog:
            finished.set()

    async def open_connection() -> _Conn:
        _, conn = await loop.create_connection(lambda: _Conn(on_done), host, port)
        conns.append(conn)
        return conn

    async def send(due: float) -> None:
        while idle:
            conn = idle.pop()
            if not conn.lost:
                st["in_flight"] += 1
                conn.send(request, time.perf_counter())
                return
        if len(conns) < args.max_connections:
            conn = await open_connection()  # a cold connection: its set-up is part of this latency
            st["in_flight"] += 1
            conn.send(request, due)
            return
        st["queued"] += st["recording"]
        backlog.append(due)

    # Open a few connections up front so connection set-up is not in the numbers.
    for _ in range(args.prewarm_connections):
        idle.append(await open_connection())

    interval = 1.0 / args.rate
    max_lag = 0.0
    for phase, count in (("warmup", args.warmup), ("measure", args.count)):
        st["recording"] = phase == "measure"
        st["all_sent"] = False
        finished.clear()
        start = time.perf_counter()
        for i in range(count):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if st["recording"]:
                max_lag = max(max_lag, time.perf_counter() - due)
            await send(due)
        sent_for = time.perf_counter() - start
        st["all_sent"] = True
        if st["in_flight"] or backlog:
            await asyncio.wait_for(finished.wait(), args.drain_seconds)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms), "rate_target": args.rate, "rate_achieved": round(args.count / sent_for, 1),
        "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None, "mean_ms": statistics.fmean(ms) if ms else None,
        "statuses": statuses, "errors": st["errors"], "connections": len(conns), "queued": st["queued"],
        "max_send_lag_ms": round(max_lag * 1000, 3),
    }


# --------------------------------------------------------------------------- line latency


async def lines(args: argparse.Namespace) -> dict:
    """Each NDJSON line carries its CLOCK_MONOTONIC write time; receive minus write is the delay."""
    import aiohttp

    token = open(args.token_file).read().strip()
    delays: list[float] = []
    timeout = aiohttp.ClientTimeout(total=args.max_seconds)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        async with session.get(args.url, headers={"Authorization": f"Bearer {token}"}) as resp:
            status = resp.status
            async for raw in resp.content:
                now = time.monotonic_ns()
                try:
                    sent = json.loads(raw)["t_ns"]
                except (ValueError, KeyError):
                    continue
                delays.append((now - sent) / 1e6)
    return {"status": status, "lines": len(delays), "p50_ms": percentile(delays, 50),
            "p99_ms": percentile(delays, 99), "max_ms": max(delays) if delays else None}


# --------------------------------------------------------------------------- many open streams


async def streams(args: argparse.Namespace) -> dict:
    """Opens --count event streams, waits for each one's first line, holds them, closes them."""
    host, port, _ = _hostport(args.base)
    token = open(args.token_file).read().strip()
    opened = 0
    failures: dict[str, int] = {}
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(args.concurrency)  # do not SYN-flood the listen backlog

    async def one(i: int) -> None:
        nonlocal opened
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writers.append(writer)
                writer.write(f"GET /v1/runs/hold-{i}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
                             f"Authorization: Bearer {token}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if head[9:12] != b"200":
                    raise ValueError(f"HTTP {head[9:12].decode()}")
                await reader.readuntil(b"\n")   # the chunk-size line
                await reader.readuntil(b"\n")   # the first event line: the stream is really flowing
                opened += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                key = type(exc).__name__ + (f": {exc}" if isinstance(exc, ValueError) else "")
                failures[key] = failures.get(key, 0) + 1

    start = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.count))), args.open_seconds)
    except asyncio.TimeoutError:
        failures["open_timeout"] = args.count - opened - sum(failures.values())
    open_took = time.monotonic() - start
    # bench.py samples the gateway's RSS while we hold; this line tells it the streams are all open.
    print(f"HOLDING {opened}", file=sys.stderr, flush=True)
    await asyncio.sleep(args.hold)
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.2)
    return {"requested": args.count, "opened": opened, "failures": failures, "open_seconds": round(open_took, 3),
            "held_seconds": args.hold}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("openloop")
    o.add_argument("--url", required=True)
    o.add_argument("--rate", type=float, default=1000)
    o.add_argument("--count", type=int, default=5000)
    o.add_argument("--warmup", type=int, default=500)
    o.add_argument("--max-connections", type=int, default=256)
    o.add_argument("--prewarm-connections", type=int, default=8)
    o.add_argument("--drain-seconds", type=float, default=30)
    l_ = sub.add_parser("lines")
    l_.add_argument("--url", required=True)
    s = sub.add_parser("streams")
    s.add_argument("--base", required=True)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--hold", type=float, default=3)
    s.add_argument("--concurrency", type=int, default=100)
    s.add_argument("--open-seconds", type=float, default=30)
    for c in (o, l_, s):
        c.add_argument("--token-file", required=True)
        c.add_argument("--max-seconds", type=float, default=120)
    args = p.parse_args()
    handler = {"openloop": openloop, "lines": lines, "streams": streams}[args.cmd]

    async def bounded() -> dict:
        return await asyncio.wait_for(handler(args), args.max_seconds)

    print(json.dumps(asyncio.run(bounded())), flush=True)


if __name__ == "__main__":
    main()
