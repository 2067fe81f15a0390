"""For tests that run the gateway as a child process: the repository root, free loopback ports,
reading what the child writes (text until a pattern, or its JSON log lines), and `serve` itself."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports nothing listens on (bound together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A loopback port nothing listens on: for a child to bind, or to be refused on."""
    return free_ports(1)[0]


async def read_until(stream: asyncio.StreamReader, pattern: str, timeout: float = 15) -> tuple[re.Match[str], str]:
    """Reads lines until what was read matches `pattern`; the match and the text read so far."""
    seen = ""
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = (await stream.readline()).decode()
                if not line:
                    raise AssertionError(f"stream ended before {pattern!r}:\n{seen}")
                seen += line
                if match := re.search(pattern, seen):
                    return match, seen
    except TimeoutError:
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{seen}") from None


async def read_json_lines(stream: asyncio.StreamReader, sink: list[tuple[float, dict]]) -> None:
    """Appends (monotonic time, object) for each JSON object line until the stream ends."""
    while line := await stream.readline():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            sink.append((time.monotonic(), entry))


class ServeProcess:
    """`arp-gateway serve` as a child process (started by `serve_process`): its URL once it has
    logged its start, and every JSON line it logs, as (monotonic time, object)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.logs: list[tuple[float, dict]] = []
        self.url = ""

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.split("://", 1)[-1].rsplit(":", 1)
        return host, int(port)


@asynccontextmanager
async def serve_process(config: Path, *, file_limit: int | None = None) -> AsyncIterator[ServeProcess]:
    """Runs the gateway on `config` in a child process (with `file_limit` descriptors when given)
    until it has logged its start; SIGTERM at the end, SIGKILL if it does not stop within 15 s."""

    def lower_file_limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), cwd=ROOT,
        env={"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=lower_file_limit, limit=1 << 20)
    served = ServeProcess(proc)
    assert proc.stdout is not None
    reading = asyncio.create_task(read_json_lines(proc.stdout, served.logs))
    try:
        async with asyncio.timeout(20):
            while not any(e.get("event") == "start" for _, e in served.logs):
                assert proc.returncode is None, "the gateway exited"
                await asyncio.sleep(0.05)  # a child process starting
        served.url = next(e["url"] for _, e in served.logs if e.get("event") == "start")
        yield served
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        reading.cancel()
