"""A real Redis for tests: Debian's `redis-server` on a free loopback port, in a temporary directory,
with no persistence, stopped at the end. Tests can pause it (SIGSTOP/SIGCONT), kill it and start it
again on the same port, or give it a password.

    with RedisServer(tmp_path) as server:          # or the `redis_server` fixture
        url = server.url                            # redis://127.0.0.1:PORT/0
        server.pause(); server.resume(); server.kill(); server.start()
        server.client().get(key)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support.process import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def have_redis() -> bool:
    return Path(REDIS_SERVER).exists()


needs_redis = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (.ci/run installs it)")


class RedisServer:
    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Starts it (again, on the same port) and waits until it answers PING."""
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.directory / "redis.log")]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"redis-server exited: {(self.directory / 'redis.log').read_text()}"
            if self._answers():
                return
            time.sleep(0.02)  # a child process starting
        raise AssertionError("redis-server did not answer PING in time")

    def client(self) -> redis.Redis:
        """A synchronous redis-py client, for set-up and inspection in tests."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
