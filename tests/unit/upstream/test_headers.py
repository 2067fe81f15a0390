"""Header hygiene on its own: what of the client's headers the coordinator may see, and what the
gateway keeps in memory to build them."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.runtime.server import start_gateway
from proxy.upstream.headers import connection_tokens, fold
from tests.support.gateway import gateway_config
from tests.support.servers import RawServer

TOKEN = "eyJsecret.token-never-a-key.signature"


async def ok(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()


def test_names_fold_the_way_cgi_stacks_read_them() -> None:
    assert fold(b"X_Auth_Subject") == fold(b"x-auth-subject") == fold(b"X-AUTH_SUBJECT") == b"x-auth-subject"
    assert connection_tokens([(b"Connection", b"close, X_Drop_Me")]) == {b"close", b"x-drop-me"}


async def test_no_header_cache_holds_the_bearer_token() -> None:
    """Only the verified-token cache may key on a token: the forwarded-header cache is keyed by the
    client's headers without Authorization, however many requests reuse them."""
    coordinator = RawServer(ok)
    server, url = await start_gateway(gateway_config(await coordinator.start()))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(url + "/v1/runs/r1", headers={"Authorization": f"Bearer {TOKEN}",
                                                                  "X-Trace": "t1"}) as resp:
                    assert resp.status == 200
        cache = server.gateway.upstream._client_headers._blocks._data  # the one header-block cache on the path
        assert len(cache) == 1
        (key, block), = cache.items()
        assert TOKEN.encode() not in repr(key).encode() and TOKEN.encode() not in block
        assert b"X-Trace: t1" in block
        # Auth is disabled here, so the gateway passes the client's token on as the dev principal's:
        # in the request it sends, never through the header cache.
        assert all(f"Authorization: Bearer {TOKEN}".encode() in seen for seen in coordinator.requests)
    finally:
        await server.cleanup()
        await coordinator.close()
