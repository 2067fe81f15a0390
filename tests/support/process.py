"""For tests that run the gateway as a child process: the repository root, free loopback ports,
and reading what the child writes (text until a pattern, or its JSON log lines)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
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
