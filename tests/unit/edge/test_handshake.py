"""A TLS connection holds one slot under the cap from accept to close, over real sockets on 127.0.0.1,
under both loops the gateway runs on (uvloop's SSLProtocol and asyncio's)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.edge.listener import EdgeLimits, Listener
from proxy.edge.tls import CertificateFiles, ServerTls
from proxy.util.certificates import TlsFiles, build_context
from tests.support.certs import Pair, Pki, install
from tests.unit.edge.harness import FakeHandler, Metrics

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pair]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    return pki, pki.ca("handshake-ca")


def run(loop: str, work: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(work, 20))


async def started(tmp_path: Path, ca: tuple[Pki, Pair], **limits: Any) -> tuple[Listener, ServerTls, int, Metrics]:
    pki, root = ca
    install(pki.issue(root, "localhost"), tmp_path)
    files = CertificateFiles("listen", TlsFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")),
                             lambda f: build_context(f, server=True), reload_interval_s=60)
    tls = ServerTls(files)
    metrics = Metrics()
    listener = Listener(FakeHandler(), EdgeLimits(**limits), metrics)
    url = await listener.start("127.0.0.1", 0, tls=tls)
    return listener, tls, int(url.rsplit(":", 1)[1]), metrics


def client(ca: tuple[Pki, Pair]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca[1].cert))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_holds_one_slot_through_its_handshake_and_after(loop: str, tmp_path: Path,
                                                                      ca: tuple[Pki, Pair]) -> None:
    async def scenario() -> None:
        listener, tls, port, metrics = await started(tmp_path, ca, max_connections=1)
        try:
            handler: Any = listener.handler
            handler.later = True   # the request stays in flight: its connection cannot be reclaimed
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client(ca),
                                                           server_hostname="localhost")
            writer.write(b"GET /v1/runs/r1 HTTP/1.1\r\nHost: a\r\n\r\n")
            while not handler.requests:
                await asyncio.sleep(0.01)
            assert len(listener.connections) == 1      # the handshake's slot passed to the connection
            # The slot is taken: the next client is closed at accept, and counted.
            refused, other = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(refused.read(), 5) == b""
            other.close()
            assert metrics.events == [("connections_refused", "max_connections")]
            handler.release(handler.requests[0])
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            handler.later = False
            writer.close()
            while listener.connections:
                await asyncio.sleep(0.01)
            # Freed at close: a new client gets in, and its request is answered over the same loop's TLS.
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client(ca),
                                                           server_hostname="localhost")
            writer.write(b"GET /v1/runs/r2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert b"GET /v1/runs/r2" in await reader.read()
            writer.close()
            assert tls.failures == {}
        finally:
            await listener.close(grace_s=1)

    run(loop, scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_closing_the_listener_cuts_handshakes_in_progress_uncounted(loop: str, tmp_path: Path,
                                                                    ca: tuple[Pki, Pair]) -> None:
    async def scenario() -> None:
        listener, tls, port, _ = await started(tmp_path, ca, header_timeout_s=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01")
        while not listener.connections:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(listener.close(grace_s=5), 2)   # well before the header timeout
        assert listener.connections == {}
        try:   # aborted: nothing is owed to a client mid-handshake (a reset, or an end, by loop)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        assert tls.failures == {}     # the gateway closed it: neither a timeout nor the client's doing

    run(loop, scenario())
