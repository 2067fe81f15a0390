"""Certificate-bound tokens (RFC 8705) at the listener, and a coordinator behind a private CA that
requires a client certificate; all over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.runtime.server import start_gateway
from tests.e2e.tls.conftest import Certs
from tests.e2e.tls.test_listener import RUN, client_context, exchange, tls_section
from tests.support.certs import Pair, install
from tests.support.gateway import RUN_START, Upstream, gateway_config, json_response
from tests.support.keys import AUDIENCE, JwksServer, signer

# --------------------------------------------------------------------------- RFC 8705 bound tokens


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


def run_start(token: str) -> bytes:
    body = json.dumps(RUN_START).encode()
    return (b"POST /v1/runs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def envelope(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else {}


async def test_a_bound_token_works_only_with_its_certificate(tmp_path: Path, certs: Certs, jwks: JwksServer) -> None:
    coordinator = Upstream()
    coordinator.route("POST", "/v1/runs", lambda _r: _answer())
    await coordinator.start()
    key = signer("bound", "ES256")
    jwks.publish("t", key)
    live = tmp_path / "live"
    install(certs.server1, live)
    cfg = gateway_config(
        coordinator.url,
        listen=tls_section(live, client_ca_file=str(certs.ca.cert), client_auth="optional"),
        auth={"mode": "required", "issuers": [{"issuer": jwks.issuer("t"), "audiences": [AUDIENCE],
                                               "jwks_uri": jwks.jwks_uri("t"), "algorithms": ["ES256"],
                                               "require_certificate_binding": True}]})
    server, url = await start_gateway(cfg)
    port = int(url.rsplit(":", 1)[1])
    now = int(time.time())
    claims = {"iss": jwks.issuer("t"), "aud": AUDIENCE, "sub": "agent-a", "iat": now, "exp": now + 300}
    bound = key.sign({**claims, "cnf": {"x5t#S256": certs.client_a.thumbprint}})
    unbound = key.sign(claims)
    try:
        status, _ = envelope(await exchange(port, client_context(certs, certs.client_a), run_start(bound)))
        assert status == 201
        # The same token, verified and cached by now, from another client: a stolen token is useless.
        status, body = envelope(await exchange(port, client_context(certs, certs.client_b), run_start(bound)))
        assert (status, body["error"]["code"], body["error"]["details"]["reason"]) == (
            401, "unauthorized", "certificate_binding_mismatch")
        status, body = envelope(await exchange(port, client_context(certs), run_start(bound)))
        assert (status, body["error"]["details"]["reason"]) == (401, "certificate_required")
        status, body = envelope(await exchange(port, client_context(certs, certs.client_a), run_start(unbound)))
        assert (status, body["error"]["details"]["reason"]) == (401, "certificate_binding_mismatch")
        assert len(coordinator.requests) == 1   # nothing refused was forwarded
    finally:
        await server.cleanup()
        await coordinator.close()


async def _answer() -> web.Response:
    return json_response(201, RUN)


# --------------------------------------------------------------------------- upstream TLS


async def strict_coordinator(certs: Certs, server: Pair) -> tuple[web.AppRunner, int, list[str]]:
    """A coordinator on HTTPS that requires a client certificate from `certs.ca`; records who called."""
    callers: list[str] = []

    async def start_run(request: web.Request) -> web.Response:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        callers.append(dict(i[0] for i in cert["subject"])["commonName"] if cert else "")
        return json_response(201, RUN)

    async def health(_request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/runs", start_run)
    app.router.add_get("/v1/health", health)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca.cert))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(server.cert), str(server.key))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1], callers


async def test_strict_coordinator_behind_a_private_ca(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    runner, port, callers = await strict_coordinator(certs, certs.server1)
    # Each gateway in turn: the right CA, then another CA.
    trusted = {"ca_file": str(certs.ca.cert), "cert_file": str(certs.client_a.cert),
               "key_file": str(certs.client_a.key), "server_name": "localhost"}
    wrong = {**trusted, "ca_file": str(certs.other_ca.cert)}
    try:
        for tls, expected in ((trusted, 201), (wrong, 502)):
            cfg = gateway_config(f"https://127.0.0.1:{port}", upstream={
                "url": f"https://127.0.0.1:{port}", "connect_timeout_s": 2, "tls": tls,
                "retries": {"attempts": 1}})
            server, url = await start_gateway(cfg)
            gateway_port = int(url.rsplit(":", 1)[1])
            try:
                with caplog.at_level(logging.WARNING, logger="proxy.upstream"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
                    writer.write(run_start("unused"))
                    async with asyncio.timeout(10):
                        answer = await reader.read()
                    writer.close()
                status, body = envelope(answer)
                assert status == expected, answer[:300]
                if expected == 201:
                    assert callers == ["client-a"]
                    health = await server.gateway.probe.health()
                    assert health["status"] == "ok", health
                else:
                    assert body["error"]["code"] == "run_coordinator_unavailable"
                    errors = [getattr(r, "error", "") for r in caplog.records if getattr(r, "event", "") ==
                              "upstream_error"]
                    assert any("TLS" in e and "certificate verify failed" in e for e in errors), errors
                    assert callers == ["client-a"]
            finally:
                await server.cleanup()
    finally:
        await runner.cleanup()


async def test_upstream_client_certificate_is_reloaded(tmp_path: Path, certs: Certs) -> None:
    runner, port, callers = await strict_coordinator(certs, certs.server1)
    live = tmp_path / "client"
    install(certs.client_a, live)
    cfg = gateway_config(f"https://127.0.0.1:{port}", upstream={
        "url": f"https://127.0.0.1:{port}", "keepalive_idle_s": 0.05, "retries": {"attempts": 1},
        "tls": {"ca_file": str(certs.ca.cert), "cert_file": str(live / "tls.crt"),
                "key_file": str(live / "tls.key"), "server_name": "localhost", "reload_interval_s": 0.1}})
    server, url = await start_gateway(cfg)
    gateway_port = int(url.rsplit(":", 1)[1])

    async def start() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
        writer.write(run_start("unused"))
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        return envelope(answer)[0]

    try:
        assert await start() == 201
        install(certs.client_b, live)
        deadline = time.monotonic() + 5
        while callers[-1] != "client-b":
            assert time.monotonic() < deadline, callers
            await asyncio.sleep(0.15)   # past keepalive_idle_s: the next request opens a new connection
            assert await start() == 201
    finally:
        await server.cleanup()
        await runner.cleanup()


# --------------------------------------------------------------------------- the certificate in the policy's context


async def test_a_policy_admits_run_starts_from_one_spiffe_id(tmp_path: Path, certs: Certs) -> None:
    coordinator = Upstream()
    coordinator.route("POST", "/v1/runs", lambda _r: _answer())
    await coordinator.start()
    policy = tmp_path / "spiffe.json"
    policy.write_text(json.dumps({"Version": "2025-01-01", "Statement": [
        {"Sid": "agent-a-starts", "Effect": "Allow", "Action": "run:Start", "Resource": "node_type:*",
         "Condition": {"StringLike": {"client_cert.uri": "spiffe://arp.test/agent-a"}}}]}))
    live = tmp_path / "live"
    install(certs.server1, live)
    cfg = gateway_config(
        coordinator.url,
        listen=tls_section(live, client_ca_file=str(certs.ca.cert), client_auth="optional"),
        authorization={"policy_file": str(policy)})
    server, url = await start_gateway(cfg)
    port = int(url.rsplit(":", 1)[1])
    start = (b"POST /v1/runs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(json.dumps(RUN_START)) + json.dumps(RUN_START).encode())
    try:
        status, _ = envelope(await exchange(port, client_context(certs, certs.client_a), start))
        assert status == 201
        for refused in (client_context(certs, certs.client_b), client_context(certs)):
            status, body = envelope(await exchange(port, refused, start))
            assert (status, body["error"]["code"], body["error"]["details"]["reason"]) == (
                403, "forbidden", "policy_denied")
        assert len(coordinator.requests) == 1   # nothing refused was forwarded
    finally:
        await server.cleanup()
        await coordinator.close()
