"""Small loopback servers that bench.py runs as separate, CPU-pinned processes.

    python tests/bench/servers.py issuer --port P --out DIR     # proxy.dev.issuer + token/PEM files
    python tests/bench/servers.py token-endpoint --port P       # stand-in OAuth token endpoint (JARVIS)
    python tests/bench/servers.py stream-upstream --port P      # NDJSON event streams

Each prints one `READY ...` line on stdout once it listens, then serves until
SIGTERM/SIGINT or its --max-seconds runs out (nothing here outlives a bench run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

# `proxy` comes from the project venv (editable install) or PYTHONPATH; the repo
# root is only a fallback for a python without the project installed.
sys.path.append(str(Path(__file__).resolve().parents[2]))

AUDIENCE = "arp-run-gateway"


async def _serve_until_stopped(max_seconds: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except asyncio.TimeoutError:
        pass


# --------------------------------------------------------------------------- issuer


async def issuer(args: argparse.Namespace) -> None:
    """The project's own dev issuer, so the gateway verifies through its production path.

    Writes token.txt (an RS256 access token valid for the whole run),
    pubkey.pem (the same key as a PEM public key, for HAProxy's jwt_verify)
    and two tokens every verifier must refuse (expired.txt, wrong-aud.txt).
    """
    from proxy.dev import issuer as devissuer

    runner, iss = await devissuer.start(port=args.port)
    try:
        out = Path(args.out)

        def publish(name: str, data: bytes) -> None:  # rename: a reader never sees half a file
            (out / f".{name}").write_bytes(data)
            (out / f".{name}").rename(out / name)

        publish("pubkey.pem", iss.key.as_pem(private=False))
        # Refused-token probes: bench.py checks that every auth target really says 401 to them.
        publish("expired.txt", iss.mint(sub="bench", aud=AUDIENCE, ttl=-600).encode())
        publish("wrong-aud.txt", iss.mint(sub="bench", aud="someone-else", ttl=3600).encode())
        publish("token.txt", iss.mint(sub="bench", aud=AUDIENCE, ttl=int(args.ttl)).encode())  # last: "ready"
        print(f"READY {iss.url}", flush=True)
        await _serve_until_stopped(args.max_seconds)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- token endpoint


async def token_endpoint(args: argparse.Namespace) -> None:
    """Answers every POST with a token: JARVIS asks for one on each proxied call."""
    from aiohttp import web

    body = json.dumps({"access_token": "bench-outbound-token", "expires_in": 300,
                       "token_type": "Bearer"}).encode()

    async def token(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    try:
        print(f"READY http://127.0.0.1:{args.port}", flush=True)
        await _serve_until_stopped(args.max_seconds)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- stream upstream
#
# A raw asyncio protocol instead of aiohttp: at GiB volumes the upstream must
# not be the bottleneck, so it writes large pre-built chunks with no framework
# between them and the socket. What a stream does is encoded in the run id:
#
#   GET /v1/runs/bulk-<MiB>/events          <MiB> of NDJSON as fast as the reader takes it
#   GET /v1/runs/tick-<n>-<ms>/events       n lines, one every <ms>, each with its CLOCK_MONOTONIC write time
#   GET /v1/runs/hold-<i>/events            one line a second until the reader goes away (bounded)
#   GET /v1/health                          {"status":"ok"}

LINE = b'{"type":"node_run.progress","run_id":"bench","payload":{"pad":"' + b"x" * 160 + b'"}}\n'
BLOCK = LINE * (256 * 1024 // len(LINE))           # ~256 KiB of whole lines per chunk
HOLD_MAX_S = 120.0


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamUpstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=1024 * 1024)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None and b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.task = asyncio.ensure_future(self.respond(head))

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()
        if self.task is not None:
            self.task.cancel()

    async def write(self, data: bytes) -> None:
        await self.can_write.wait()
        if self.closed:
            raise ConnectionError
        assert self.transport is not None
        self.transport.write(data)

    async def respond(self, head: bytes) -> None:
        try:
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            await self.route(target)
            # Keep-alive: the gateway and nginx pool their upstream connections.
            self.task = None
            if b"\r\n\r\n" in self.buf:
                self.data_received(b"")
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bench helper: say what broke, drop the connection
            print(f"stream-upstream: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if self.transport is not None:
                self.transport.close()

    async def route(self, target: str) -> None:
        parts = target.split("?")[0].split("/")
        if target == "/v1/health":
            body = b'{"status":"ok"}'
            await self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        if len(parts) != 5 or parts[1:3] != ["v1", "runs"] or parts[4] != "events":
            await self.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        kind, *nums = parts[3].split("-")
        await self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
        if kind == "bulk":
            remaining = int(nums[0]) * 1024 * 1024
            framed = _chunk(BLOCK)
            while remaining >= len(BLOCK):
                await self.write(framed)
                remaining -= len(BLOCK)
            if remaining:
                await self.write(_chunk(BLOCK[:remaining]))
        elif kind == "tick":
            count, interval = int(nums[0]), int(nums[1]) / 1000
            start = time.monotonic()
            for seq in range(count):
                # Absolute schedule: a late wake-up does not push every later line back.
                await asyncio.sleep(max(0.0, start + seq * interval - time.monotonic()))
                line = b'{"seq":%d,"t_ns":%d}\n' % (seq, time.monotonic_ns())
                await self.write(_chunk(line))
        elif kind == "hold":
            deadline = time.monotonic() + HOLD_MAX_S
            seq = 0
            while time.monotonic() < deadline:
                await self.write(_chunk(b'{"seq":%d,"type":"heartbeat"}\n' % seq))
                seq += 1
                await asyncio.sleep(1.0)
        await self.write(b"0\r\n\r\n")


async def stream_upstream(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StreamUpstream, "127.0.0.1", args.port, backlog=4096)
    try:
        print(f"READY http://127.0.0.1:{args.port}", flush=True)
        await _serve_until_stopped(args.max_seconds)
    finally:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("issuer")
    i.add_argument("--out", required=True)
    i.add_argument("--ttl", type=int, default=6 * 3600)
    for s in (i, sub.add_parser("token-endpoint"), sub.add_parser("stream-upstream")):
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--max-seconds", type=float, default=4 * 3600)
    args = p.parse_args()
    handler = {"issuer": issuer, "token-endpoint": token_endpoint, "stream-upstream": stream_upstream}[args.cmd]
    try:
        asyncio.run(handler(args))
    except OSError as exc:
        print(f"servers.py {args.cmd}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
