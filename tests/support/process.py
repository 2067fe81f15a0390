"""For tests that run the gateway as a child process: the repository root, a free loopback port,
and the JSON log lines it writes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def read_json_lines(stream: asyncio.StreamReader, sink: list[tuple[float, dict]]) -> None:
    """Appends (monotonic time, object) for each JSON object line until the stream ends."""
    while line := await stream.readline():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            sink.append((time.monotonic(), entry))
