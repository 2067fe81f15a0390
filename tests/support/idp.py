"""Python driver for the mock OpenID Connect IdP in ``tests/idp/server.mjs`` (oauth2-mock-server 8.x).

Each :class:`MockIdp` is its own ``node`` child process. It listens on
``127.0.0.1:<ephemeral port>`` and serves:

* ``GET {issuer}/.well-known/openid-configuration``: discovery, with ``issuer`` and
  ``jwks_uri`` on 127.0.0.1
* ``GET {issuer}/jwks``: the public RS256 keys
* ``POST {issuer}/token`` and the library's other endpoints, which these tests do not need

Python drives it over stdin/stdout: one JSON command per line, one JSON answer per line.
The protocol is described in ``tests/idp/server.mjs``.

Tests take it from tests/conftest.py: `idp` (one for the run, shared; tests/support/threadidp.py)
or `fresh_idp` (a test's own, to rotate or stop). Directly::

    idp = await MockIdp.start()
    try:
        token = await idp.token({"sub": "alice", "aud": "arp-gateway"}, ttl=300)
        ...
        new_kid = await idp.rotate()      # old key removed from the JWKS
        await idp.stop_listening()        # outage: connection refused, same port kept
        await idp.start_listening()       # back on the same port with the same keys
    finally:
        await idp.close()

    # or: async with await MockIdp.start() as idp: ...

Prerequisite: ``npm ci --prefix tests/idp``.

The child process belongs to the event loop that started it. Start and close it in the same
loop, which is normally the test's or fixture's loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
from pathlib import Path
from typing import Any

IDP_DIR = Path(__file__).resolve().parents[1] / "idp"
SERVER_SCRIPT = IDP_DIR / "server.mjs"
_MARKER_MODULE = IDP_DIR / "node_modules" / "oauth2-mock-server" / "package.json"

__all__ = ["MockIdp", "MockIdpError"]


class MockIdpError(RuntimeError):
    """The mock IdP could not be started, or it answered a command with an error."""


class MockIdp:
    """A running mock IdP. Create one with ``await MockIdp.start()``."""

    def __init__(self, proc: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self._proc = proc
        self._issuer: str = ready["issuer"]
        self._port: int = int(ready["port"])
        self._kid: str = ready["kid"]
        self._listening = True
        self._lock = asyncio.Lock()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._stderr_task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def start(cls, *, node: str | None = None, startup_timeout: float = 30.0) -> MockIdp:
        """Start ``node tests/idp/server.mjs`` and wait for its ready line."""
        if not _MARKER_MODULE.is_file():
            raise MockIdpError(
                f"oauth2-mock-server is not installed ({_MARKER_MODULE.parent} missing). "
                f"Run `npm ci --prefix tests/idp` from the repository root first."
            )
        node_bin = node or os.environ.get("MOCK_IDP_NODE") or shutil.which("node")
        if not node_bin:
            raise MockIdpError("`node` (Node.js >= 20.19) was not found on PATH; it is needed to run the mock IdP.")

        proc = await asyncio.create_subprocess_exec(
            node_bin,
            str(SERVER_SCRIPT),
            cwd=str(IDP_DIR),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=4 * 1024 * 1024,  # a line may hold a JWKS or a large token
        )
        stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        stderr_task = asyncio.create_task(cls._drain(proc.stderr, stderr_tail))
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), startup_timeout)
            if not line:
                await asyncio.wait_for(proc.wait(), 5)
                await asyncio.wait_for(asyncio.shield(stderr_task), 5)
                raise MockIdpError(
                    f"mock IdP exited before becoming ready (exit code {proc.returncode}).\n"
                    + "\n".join(stderr_tail)
                )
            try:
                ready = json.loads(line)
                ready["issuer"], ready["port"], ready["kid"]
            except (ValueError, KeyError, TypeError):
                raise MockIdpError(f"unexpected ready line from mock IdP: {line!r}") from None
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr_task.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise MockIdpError(
                    f"mock IdP did not become ready within {startup_timeout}s.\n" + "\n".join(stderr_tail)
                ) from None
            raise
        self = cls(proc, ready)
        self._stderr_tail = stderr_tail
        self._stderr_task = stderr_task
        return self

    async def close(self) -> None:
        """Stop the node process. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc.returncode is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()  # EOF makes server.mjs exit
            except (OSError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._stderr_task is not None:
            try:
                await asyncio.wait_for(self._stderr_task, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass

    async def __aenter__(self) -> MockIdp:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ properties

    @property
    def issuer(self) -> str:
        """E.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        return self._issuer

    @property
    def port(self) -> int:
        return self._port

    @property
    def jwks_uri(self) -> str:
        return f"{self._issuer}/jwks"

    @property
    def discovery_url(self) -> str:
        return f"{self._issuer}/.well-known/openid-configuration"

    @property
    def token_endpoint(self) -> str:
        return f"{self._issuer}/token"

    @property
    def kid(self) -> str:
        """kid of the current signing key."""
        return self._kid

    @property
    def listening(self) -> bool:
        return self._listening

    @property
    def stderr(self) -> str:
        """The last lines the node process wrote to stderr, for debugging."""
        return "\n".join(self._stderr_tail)

    # ------------------------------------------------------------------ commands

    async def token(
        self,
        claims: dict[str, Any] | None = None,
        ttl: int | float = 300,
        *,
        kid: str | None = None,
        header: dict[str, Any] | None = None,
    ) -> str:
        """Mint a JWT signed with RS256.

        The payload is ``{"iss": issuer, "iat": now, "nbf": now - 10, "exp": now + ttl}`` with
        ``claims`` merged over it. A claim whose value is ``None`` is removed, for example
        ``{"exp": None}`` gives a token with no ``exp``. ``ttl`` may be negative, which gives a
        token that has already expired. ``kid`` picks another key from the key store; the
        default is the current signing key. ``header`` entries are merged into the JOSE header,
        for example ``{"kid": "unknown"}``. The ``alg`` header cannot be overridden.
        """
        cmd: dict[str, Any] = {"cmd": "token", "claims": claims or {}, "ttl": ttl}
        if kid is not None:
            cmd["kid"] = kid
        if header:
            cmd["header"] = header
        answer = await self._command(cmd)
        return answer["token"]

    async def rotate(self, *, keep_old: bool = False) -> str:
        """Make a new signing key and return its kid.

        With ``keep_old=False`` (the default), the previous key is removed from the JWKS.
        With ``keep_old=True`` it stays published, for an overlapping rotation.
        """
        answer = await self._command({"cmd": "rotate", "keep_old": keep_old})
        self._kid = answer["kid"]
        return self._kid

    async def jwks(self) -> dict[str, Any]:
        """The public JWKS, read over the control channel. This works while stopped."""
        answer = await self._command({"cmd": "jwks"})
        return {"keys": answer["keys"]}

    async def stop_listening(self) -> None:
        """Simulate an IdP outage.

        The listening socket is closed and every open connection, including keep-alive ones, is
        destroyed. The process, port number, issuer and keys are kept, and :meth:`token` still works.
        """
        await self._command({"cmd": "stop"})
        self._listening = False

    async def start_listening(self) -> None:
        """End the outage: listen again on the same port, with the same keys."""
        answer = await self._command({"cmd": "start"})
        if int(answer["port"]) != self._port:  # pragma: no cover - the server always reuses its port
            raise MockIdpError(f"mock IdP came back on port {answer['port']} instead of {self._port}")
        self._listening = True

    # ------------------------------------------------------------------ internals

    async def _command(self, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        if self._closed:
            raise MockIdpError("mock IdP is closed")
        async with self._lock:
            proc = self._proc
            if proc.returncode is not None:
                raise MockIdpError(f"mock IdP process has exited (code {proc.returncode}).\n{self.stderr}")
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            try:
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            except (ConnectionError, asyncio.TimeoutError) as exc:
                raise MockIdpError(f"mock IdP did not answer {cmd.get('cmd')!r}: {exc!r}\n{self.stderr}") from None
            if not line:
                raise MockIdpError(f"mock IdP closed stdout while handling {cmd.get('cmd')!r}.\n{self.stderr}")
        answer = json.loads(line)
        if "error" in answer:
            raise MockIdpError(f"mock IdP rejected {cmd.get('cmd')!r}: {answer['error']}")
        return answer

    @staticmethod
    async def _drain(stream: asyncio.StreamReader | None, sink: collections.deque[str]) -> None:
        if stream is None:
            return
        while True:
            line = await stream.readline()
            if not line:
                return
            sink.append(line.decode(errors="replace").rstrip())

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._listening else "stopped")
        return f"<MockIdp {self._issuer} kid={self._kid[:12]}… {state}>"
