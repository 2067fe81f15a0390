"""HTTPS on the public listener, over real sockets on 127.0.0.1: certificates replaced under a
running gateway, client certificates, refusals at the handshake, and the edge's limits over TLS."""

from __future__ import annotations

import asyncio
import ssl
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.runtime.server import GatewayServer, start_gateway
from tests.e2e.tls.conftest import Certs
from tests.support.certs import Pair, install
from tests.support.gateway import RUN_START, Upstream, gateway_config, json_response

RUN = {"run_id": "run_1", "state": "queued"}


def client_context(certs: Certs, pair: Pair | None = None, *, ca: Pair | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str((ca or certs.ca).cert))
    if pair is not None:
        context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


async def served_name(port: int, context: ssl.SSLContext) -> str:
    """The CN of the certificate a new handshake gets."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        cert = writer.get_extra_info("peercert")
        return dict(item[0] for item in cert["subject"])["commonName"]
    finally:
        writer.close()


@pytest.fixture
async def coordinator() -> AsyncIterator[Upstream]:
    upstream = Upstream()

    async def start_run(_request: Any) -> Any:
        return json_response(201, RUN)

    upstream.route("POST", "/v1/runs", start_run)
    upstream.route("GET", "/v1/runs/{run_id}", start_run)
    await upstream.start()
    yield upstream
    await upstream.close()


class Running:
    def __init__(self, server: GatewayServer, url: str) -> None:
        self.server, self.url = server, url
        self.port = int(url.rsplit(":", 1)[1])

    def exposition(self) -> str:
        metrics = self.server.gateway.metrics
        assert metrics is not None
        return metrics.exposition()[0].decode()

    def counter(self, line: str) -> float:
        for row in self.exposition().splitlines():
            if row.startswith(line + " "):
                return float(row.rsplit(" ", 1)[1])
        return 0.0


def tls_section(live: Path, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": 0,
            "tls": {"cert_file": str(live / "tls.crt"), "key_file": str(live / "tls.key"), **extra}}


async def post_run(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/v1/runs", json=RUN_START) as resp:
        await resp.read()
        return resp.status


# --------------------------------------------------------------------------- reload


@pytest.fixture
def live(tmp_path: Path, certs: Certs) -> Path:
    directory = tmp_path / "live"
    install(certs.server1, directory)
    return directory


def reload_sections(live: Path) -> dict[str, Any]:
    return {"listen": tls_section(live, reload_interval_s=0.2)}


async def test_certificates_replaced_twice_under_load_fail_no_request(tmp_path: Path, certs: Certs,
                                                                      coordinator: Upstream) -> None:
    live = tmp_path / "live"
    install(certs.server1, live)
    cfg = gateway_config(coordinator.url, metrics={"enabled": True, "port": 0}, **reload_sections(live))
    server, url = await start_gateway(cfg)
    gw = Running(server, url)
    context = client_context(certs)
    statuses: list[int | str] = []
    stop = asyncio.Event()

    async def drive(fresh: bool) -> None:
        # New connections see each new certificate; keep-alive ones keep theirs: neither may fail.
        connector = aiohttp.TCPConnector(ssl=context, force_close=fresh)
        async with aiohttp.ClientSession(connector=connector) as http:
            deadline = time.monotonic() + 30
            for _ in range(5000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    statuses.append(await post_run(http, url))
                except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
                    statuses.append(type(exc).__name__)

    async def served_within(name: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while await served_name(gw.port, context) != name:
            assert time.monotonic() < deadline, f"{name} not served within {seconds} s"
            await asyncio.sleep(0.05)

    try:
        drivers = [asyncio.create_task(drive(fresh)) for fresh in (True, False)]
        assert await served_name(gw.port, context) == "server1"
        await asyncio.sleep(0.2)
        install(certs.server2, live)
        await served_within("server2", 0.2 + 2)   # reload_interval_s, and slack for a loaded machine
        await asyncio.sleep(0.2)
        install(certs.server1, live)
        await served_within("server1", 0.2 + 2)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*drivers)
        assert statuses and set(statuses) == {201}, sorted(set(map(str, statuses)))
        assert gw.counter('arp_gateway_tls_reloads_total{certificate="listen",result="success"}') == 2
        expiry = gw.counter('arp_gateway_tls_certificate_expiry_timestamp_seconds{certificate="listen"}')
        assert expiry > time.time() + 20 * 86400

        # A mismatched pair, then an expired one: refused, counted, the old one stays in service.
        for bad in (Pair("mismatch", certs.server2.cert, certs.server1.key), certs.expired):
            before = gw.counter('arp_gateway_tls_reloads_total{certificate="listen",result="failure"}')
            install(bad, live)
            deadline = time.monotonic() + 5
            while gw.counter('arp_gateway_tls_reloads_total{certificate="listen",result="failure"}') == before:
                assert time.monotonic() < deadline, "the bad pair was never tried"
                await asyncio.sleep(0.05)
            assert await served_name(gw.port, context) == "server1"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
                assert await post_run(http, url) == 201
        assert gw.counter('arp_gateway_tls_reloads_total{certificate="listen",result="failure"}') == 2
    finally:
        stop.set()
        await server.cleanup()


async def test_kubelet_symlink_swap_and_sighup(tmp_path: Path, certs: Certs, coordinator: Upstream) -> None:
    """A Secret volume: tls.crt -> ..data/tls.crt, ..data -> a timestamped directory swapped by rename.
    With a long interval the swap is picked up by SIGHUP's reload hooks."""
    volume = tmp_path / "secret"
    first = volume / "..2026_01"
    install(certs.server1, first)
    (volume / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    cfg = gateway_config(coordinator.url, metrics={"enabled": True, "port": 0},
                         listen=tls_section(volume, reload_interval_s=3600))
    server, url = await start_gateway(cfg)
    gw = Running(server, url)
    context = client_context(certs)
    try:
        assert await served_name(gw.port, context) == "server1"
        second = volume / "..2026_02"
        install(certs.server2, second)
        (volume / "..data_tmp").symlink_to(second.name)
        (volume / "..data_tmp").replace(volume / "..data")
        assert await served_name(gw.port, context) == "server1"   # not before the check
        server.reload.run()                                         # what SIGHUP runs
        assert await served_name(gw.port, context) == "server2"
    finally:
        await server.cleanup()


# --------------------------------------------------------------------------- client certificates


async def exchange(port: int, context: ssl.SSLContext, request: bytes = b"GET /v1/runs/run_1 HTTP/1.1\r\n"
                   b"Host: localhost\r\nConnection: close\r\n\r\n") -> bytes:
    """Sends one request over a new TLS connection and reads to the end; a refused handshake
    (TLS 1.3 reports a refused client certificate at the first read) gives b""."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            return await reader.read()
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


@pytest.fixture
async def mtls(request: pytest.FixtureRequest, live: Path, certs: Certs,
               coordinator: Upstream) -> AsyncIterator[Running]:
    cfg = gateway_config(coordinator.url, metrics={"enabled": True, "port": 0},
                         listen=tls_section(live, client_ca_file=str(certs.ca.cert), client_auth=request.param))
    server, url = await start_gateway(cfg)
    yield Running(server, url)
    await server.cleanup()


@pytest.mark.parametrize("mtls", ["required"], indirect=True)
async def test_required_client_certificate_refused_at_handshake(mtls: Running, certs: Certs,
                                                                coordinator: Upstream) -> None:
    failures = 'arp_gateway_tls_handshake_failures_total{reason="%s"}'
    assert await exchange(mtls.port, client_context(certs)) == b""
    assert await exchange(mtls.port, client_context(certs, certs.client_other)) == b""
    answer = await exchange(mtls.port, client_context(certs, certs.client_a))
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert len(coordinator.requests) == 1
    assert coordinator.requests[0]["headers"]["X-Auth-Client-Cert-URI"] == "spiffe://arp.test/agent-a"
    assert coordinator.requests[0]["headers"]["X-Auth-Client-Cert-Subject"] == "O=ARP Test,CN=client-a"
    assert mtls.counter(failures % "no_certificate") == 1
    assert mtls.counter(failures % "bad_certificate") == 1


@pytest.mark.parametrize("mtls", ["optional"], indirect=True)
async def test_optional_client_certificate_lets_both_through(mtls: Running, certs: Certs,
                                                             coordinator: Upstream) -> None:
    without = await exchange(mtls.port, client_context(certs))
    with_cert = await exchange(mtls.port, client_context(certs, certs.client_b))
    assert without.startswith(b"HTTP/1.1 201") and with_cert.startswith(b"HTTP/1.1 201")
    first, second = coordinator.requests
    assert "X-Auth-Client-Cert-URI" not in first["headers"]
    assert second["headers"]["X-Auth-Client-Cert-URI"] == "spiffe://arp.test/agent-b"


@pytest.mark.parametrize("mtls", ["optional"], indirect=True)
async def test_a_client_cannot_forge_the_certificate_headers(mtls: Running, certs: Certs,
                                                             coordinator: Upstream) -> None:
    answer = await exchange(mtls.port, client_context(certs), b"GET /v1/runs/run_1 HTTP/1.1\r\nHost: localhost\r\n"
                            b"X-Auth-Client-Cert-URI: spiffe://arp.test/admin\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 201")
    assert "X-Auth-Client-Cert-URI" not in coordinator.requests[0]["headers"]


# --------------------------------------------------------------------------- refusals and the edge's limits


async def test_tls_1_1_and_plain_http_are_refused_cleanly(live: Path, certs: Certs, coordinator: Upstream,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    cfg = gateway_config(coordinator.url, metrics={"enabled": True, "port": 0}, listen=tls_section(live))
    server, url = await start_gateway(cfg)
    gw = Running(server, url)
    try:
        old = client_context(certs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")   # OpenSSL 3 would not even offer TLS 1.1 otherwise
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", gw.port, ssl=old, server_hostname="localhost")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /v1/runs/run_1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.read() == b""   # closed, nothing in clear text
        writer.close()
        assert gw.counter('arp_gateway_tls_handshake_failures_total{reason="protocol_version"}') == 1
        assert gw.counter('arp_gateway_tls_handshake_failures_total{reason="plain_http"}') == 1
        assert not [r for r in caplog.records if r.exc_info], "a refused handshake must not log a traceback"
        answer = await exchange(gw.port, client_context(certs))
        assert answer.startswith(b"HTTP/1.1 201")
    finally:
        await server.cleanup()


async def test_slow_handshake_is_cut_at_the_header_timeout(live: Path, certs: Certs, coordinator: Upstream) -> None:
    cfg = gateway_config(coordinator.url, listen=tls_section(live), limits={"header_timeout_s": 0.5})
    server, url = await start_gateway(cfg)
    port = int(url.rsplit(":", 1)[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01")   # the start of a ClientHello, and then nothing
        started = time.monotonic()
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        assert time.monotonic() - started < 8
        writer.close()
    finally:
        await server.cleanup()


async def test_idle_tls_connections_at_the_cap_are_reclaimed(live: Path, certs: Certs,
                                                             coordinator: Upstream) -> None:
    cfg = gateway_config(coordinator.url, listen={**tls_section(live), "max_connections": 2})
    server, url = await start_gateway(cfg)
    port = int(url.rsplit(":", 1)[1])
    context = client_context(certs)
    idle = []
    try:
        for _ in range(2):
            idle.append(await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"))
        await asyncio.sleep(0.1)   # both handshakes done and admitted
        answer = await exchange(port, context)
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    finally:
        for _, writer in idle:
            writer.close()
        await server.cleanup()


async def test_refusals_over_tls_are_enveloped_like_over_plain_http(live: Path, certs: Certs,
                                                                   coordinator: Upstream) -> None:
    cfg = gateway_config(coordinator.url, listen=tls_section(live), limits={"max_header_bytes": 9000})
    server, url = await start_gateway(cfg)
    port = int(url.rsplit(":", 1)[1])
    context = client_context(certs)
    try:
        for request, status, reason in (
                (b"GET /v1/runs/a b HTTP/1.1\r\nHost: localhost\r\n\r\n", b"400", None),
                (b"GET /v1/runs/x HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 10000 + b"\r\n\r\n", b"431",
                 b"header_too_large")):
            answer = await exchange(port, context, request)
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
            assert b'"error"' in answer and (reason is None or reason in answer)
        assert coordinator.requests == []
    finally:
        await server.cleanup()


# --------------------------------------------------------------------------- handshakes under the cap


async def test_stalled_handshakes_hold_the_cap_until_the_header_timeout(live: Path, certs: Certs,
                                                                        coordinator: Upstream) -> None:
    cfg = gateway_config(coordinator.url, metrics={"enabled": True, "port": 0},
                         listen={**tls_section(live), "max_connections": 2}, limits={"header_timeout_s": 1.0})
    server, url = await start_gateway(cfg)
    gw = Running(server, url)
    refused = 'arp_gateway_connections_refused_total{reason="max_connections"}'
    timeouts = 'arp_gateway_tls_handshake_failures_total{reason="timeout"}'
    context = client_context(certs)
    stalled = []
    try:
        for _ in range(2):   # TCP open, the start of a ClientHello, and then nothing
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"\x16\x03\x01")
            stalled.append((reader, writer))
        await asyncio.sleep(0.1)
        # A third client is turned away at accept (no answer: its handshake fails), and counted.
        assert await exchange(gw.port, context) == b""
        assert gw.counter(refused) == 1
        assert gw.counter(timeouts) == 0
        # The header timeout cuts the stalled handshakes, counted as such; then a client gets in.
        async with asyncio.timeout(10):
            for reader, _ in stalled:
                assert await reader.read() == b""
        assert gw.counter(timeouts) == 2
        answer = await exchange(gw.port, context)
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    finally:
        for _, writer in stalled:
            writer.close()
        await server.cleanup()


async def test_handshake_abandoned_by_the_client_is_counted(live: Path, certs: Certs, coordinator: Upstream,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cfg = gateway_config(coordinator.url, metrics={"enabled": True, "port": 0}, listen=tls_section(live))
    server, url = await start_gateway(cfg)
    gw = Running(server, url)
    closed = 'arp_gateway_tls_handshake_failures_total{reason="client_closed"}'
    try:
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"\x16\x03\x01")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        async with asyncio.timeout(5):
            while gw.counter(closed) < 3:
                await asyncio.sleep(0.02)
        assert gw.counter(closed) == 3
        assert len(server.listener.connections) == 0   # their slots are free again
        lines = [r for r in caplog.records if getattr(r, "event", None) == "tls_handshake_failed"]
        assert len(lines) == 1 and lines[0].reason == "client_closed"   # rate-limited
        assert not any(r.exc_info for r in caplog.records)
    finally:
        await server.cleanup()
