"""Every ErrorEnvelope the gateway makes says whether a retry can help (`error.retryable`), 4xx as
well as 5xx: a client library decides on it without a table of codes. Real sockets throughout."""

from __future__ import annotations

import asyncio
import json
from typing import Any


from tests.support.process import free_port
from tests.support.gateway import RUN_START, json_response

AUD = "arp-run-gateway"


async def raw_exchange(url: str, data: bytes, timeout: float = 5) -> tuple[int, dict[str, Any]]:
    """Sends bytes as they are and reads one answer (for what aiohttp will not send)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(head.split()[1]), json.loads(body)


async def test_every_refusal_carries_retryable(issuer, gateway, upstream, http):
    async def slow(request):
        await asyncio.sleep(1)  # outlasts the gateway's real request timeout
        return json_response(200, {})

    upstream.route("POST", "/v1/runs", lambda request: _ok())
    upstream.route("GET", "/v1/runs/{run_id}", slow)
    await upstream.start()
    auth = {"mode": "required", "issuers": [{"issuer": issuer.url, "audiences": [AUD]}],
            "rules": [{"path": "/v1/runs", "methods": ["POST"], "scopes": ["runs:write"]}]}
    url = await gateway(upstream.url, auth=auth,
                        upstream={"request_timeout_s": 0.3, "retries": {"attempts": 1}},
                        limits={"max_body_bytes": 1024, "body_timeout_s": 0.3, "max_header_bytes": 16384})
    limited = await gateway(upstream.url, auth=auth, limits={"run_start_rate": {"per_second": 0.001, "burst": 1}})
    dead = await gateway(f"http://127.0.0.1:{free_port()}", auth=auth, upstream={"retries": {"attempts": 1}})
    missing = await gateway(None, auth=auth)

    writer = {"Authorization": f"Bearer {issuer.mint(sub='w', aud=AUD, scope='runs:write')}"}
    reader = {"Authorization": f"Bearer {issuer.mint(sub='r', aud=AUD)}"}
    seen: dict[str, tuple[int, dict[str, Any]]] = {}

    async def call(name: str, method: str, base: str, path: str, **kw: Any) -> None:
        async with http.request(method, base + path, **kw) as resp:
            seen[name] = (resp.status, await resp.json(content_type=None))

    await call("no token", "GET", url, "/v1/runs/r1")
    await call("no scope", "POST", url, "/v1/runs", json=RUN_START, headers=reader)
    await call("no route", "GET", url, "/v1/nothing", headers=writer)
    await call("bad method", "DELETE", url, "/v1/runs", headers=writer)
    await call("bad body", "POST", url, "/v1/runs", json={"input": 1}, headers=writer)
    await call("too large", "POST", url, "/v1/runs", json={"pad": "x" * 2048}, headers=writer)
    await call("not json", "POST", url, "/v1/runs", data=b"x", headers={**writer, "Content-Type": "text/plain"})
    await call("first start", "POST", limited, "/v1/runs", json=RUN_START, headers=writer)
    await call("over the rate", "POST", limited, "/v1/runs", json=RUN_START, headers=writer)
    await call("slow coordinator", "GET", url, "/v1/runs/r1", headers=writer)
    await call("dead coordinator", "POST", dead, "/v1/runs", json=RUN_START, headers=writer)
    await call("no coordinator", "GET", missing, "/v1/runs/r1", headers=writer)
    seen["huge head"] = await raw_exchange(
        url, b"GET /v1/runs/r1 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 20000 + b"\r\n\r\n")
    seen["slow body"] = await raw_exchange(
        url, b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
             b"Authorization: " + writer["Authorization"].encode() + b"\r\n\r\n{")

    expected = {
        "no token": (401, False), "no scope": (403, False), "no route": (404, False),
        "bad method": (405, False), "bad body": (400, False), "too large": (413, False),
        "not json": (415, False), "over the rate": (429, True), "slow coordinator": (504, True),
        "dead coordinator": (502, True), "no coordinator": (503, False), "huge head": (431, False),
        "slow body": (408, True),
    }
    assert seen["first start"][0] == 200
    for name, (status, retryable) in expected.items():
        got_status, body = seen[name]
        assert got_status == status, (name, body)
        assert body["error"].get("retryable") is retryable, (name, body)


async def _ok():
    return json_response(200, {"run_id": "r1"})
