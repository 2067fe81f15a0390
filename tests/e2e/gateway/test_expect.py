"""`Expect: 100-continue`: answered once the body is wanted, never for a request about to be refused."""

import asyncio
import json
from urllib.parse import urlsplit

from tests.support.gateway import RUN_START

BODY = json.dumps(RUN_START).encode()


async def send_head(url: str, extra: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write((f"POST /v1/runs HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(BODY)}\r\nExpect: 100-continue\r\n{extra}\r\n").encode())
    await writer.drain()
    return reader, writer


async def test_continue_is_sent_before_the_body_and_the_run_starts(gateway, coordinator):
    reader, writer = await send_head(await gateway(coordinator))
    async with asyncio.timeout(0.5):                      # not the client's 1 s fallback wait
        assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
    writer.write(BODY)
    async with asyncio.timeout(5):
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_refused_request_gets_its_answer_without_continue(gateway, coordinator):
    auth = {"mode": "required", "issuers": [{"issuer": "http://127.0.0.1:9/idp", "audiences": ["a"],
                                             "jwks_uri": "http://127.0.0.1:9/jwks"}]}
    reader, writer = await send_head(await gateway(coordinator, auth=auth))
    async with asyncio.timeout(2):
        assert (await reader.readline()).startswith(b"HTTP/1.1 401")
    writer.close()
