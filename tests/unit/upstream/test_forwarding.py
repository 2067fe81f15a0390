"""Forwarding through a real gateway to a real coordinator, every hop on 127.0.0.1.

Each test drives the gateway as a client would and checks what a user (or the
coordinator behind the gateway) can notice: bytes on the wire, headers,
statuses, when streamed lines arrive, and how broken or slow coordinators
surface. Hand-written requests (`raw_exchange`) are used where an HTTP client
library would normalise what it sends.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from multidict import CIMultiDict
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from yarl import URL

from proxy.dev import coordinator as devcoordinator
from tests.support.gateway import RUN_START, SPEC, json_response
from tests.support.process import free_port
from tests.support.servers import RawServer, serve_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NDJSON = {"Content-Type": "application/x-ndjson"}
SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


# --------------------------------------------------------------------------- helpers


def _retrieve(uri: str) -> Resource:
    return Resource.from_contents(json.loads(Path(uri.removeprefix("file://")).read_text()),
                                  default_specification=DRAFT202012)


ENVELOPE_SCHEMA = Draft202012Validator(
    {"$ref": (SPEC / "schemas" / "common" / "error.schema.json").as_uri()},
    registry=Registry(retrieve=_retrieve))  # type: ignore[call-arg]


def check_envelope(status: int, headers: Any, body: bytes, want_status: int, want_code: str) -> dict:
    """A gateway-made error: the status, a schema-valid ErrorEnvelope, and a quotable request id."""
    assert status == want_status, body
    assert headers.get("Content-Type", "").startswith("application/json")
    doc = json.loads(body)
    ENVELOPE_SCHEMA.validate(doc)
    error = doc["error"]
    assert error["code"] == want_code, error
    assert headers.get("X-Request-ID"), "error responses must carry X-Request-ID"
    assert error["details"]["request_id"] == headers["X-Request-ID"]
    return error


async def envelope(resp: aiohttp.ClientResponse, status: int, code: str) -> dict:
    return check_envelope(resp.status, resp.headers, await resp.read(), status, code)


def exact(base: str, path: str) -> URL:
    """A URL aiohttp sends byte for byte: no requoting, no dot-segment folding."""
    return URL(base + path, encoded=True)


async def raw_exchange(base: str, method: str, target: str, headers: list[tuple[str, str]] = (),
                       body: bytes = b"") -> tuple[int, CIMultiDict[str], bytes]:
    """Sends one hand-written request (ending with `Connection: close`) and reads the answer to EOF."""
    url = URL(base)
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [] if "host" in names else [f"Host: {url.host}:{url.port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [] if "connection" in names else ["Connection: close"]
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = CIMultiDict(line.split(": ", 1) for line in header_lines)
    if "Content-Length" in parsed:
        rest = rest[: int(parsed["Content-Length"])]
    return int(status_line.split()[1]), parsed, rest


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def answer(status: int = 200, body: Any = None, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return json_response(status, body if body is not None else {"ok": True}, **headers)
    return handler


def sequence(*handlers: Handler) -> Handler:
    """Answers the n-th request with the n-th handler (the last one repeats)."""
    calls = itertools.count()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await handlers[min(next(calls), len(handlers) - 1)](request)
    return handler


async def open_stream(request: web.Request, headers: Any = None) -> web.StreamResponse:
    """A prepared chunked NDJSON response, as the coordinator's event stream is."""
    resp = web.StreamResponse(headers=headers)
    resp.content_type = NDJSON["Content-Type"]
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    return resp


@pytest.fixture
def gw(gateway: Any):
    """`await gw(url, upstream={...}, **sections)`: conftest's factory; its URL parameter is positional
    only, so the `upstream` config section passes as a keyword and merges over the test defaults."""
    return gateway


@pytest.fixture
def through(gw: Any, upstream: Any) -> Callable[..., Awaitable[str]]:
    """`url = await through(handler, **sections)`: a gateway in front of `upstream` answering everything."""
    async def start(handler: Handler | None = None, **sections: Any) -> str:
        upstream.route("*", "/{tail:.*}", handler or answer())
        return await gw(await upstream.start(), **sections)
    return start


def retries(attempts: int) -> dict[str, Any]:
    return {"retries": {"attempts": attempts, "backoff_initial_s": 0.01, "backoff_max_s": 0.02}}


# --------------------------------------------------------------------------- requests reach the coordinator intact

ODD_JSON = (b'  {"input" :{"s":"caf\\u00e9 \\ud83d\\ude00 \xe2\x9c\x93","n":1.50E+2 ,"e":[ ],"z":-0.0},\r\n'
            b'\t"root_node_type_ref":{ "version":"0.3.3","node_type_id":"a.b" } }\n\n')


async def test_start_run_keeps_method_raw_path_query_and_body_bytes(through, upstream, http) -> None:
    url = await through(answer(200, {"run_id": "r1", "state": "queued"}))
    target = "/v1/runs?x=1&y=%20&z=a+b&u=%E2%9C%93&c=a%2Fb&q=%41&e=&flag"
    async with http.post(exact(url, target), data=ODD_JSON,
                         headers={"Content-Type": "application/json; charset=utf-8"}) as resp:
        assert resp.status == 200, await resp.text()
    [seen] = upstream.requests
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", target, ODD_JSON)
    assert seen["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert seen["headers"]["Content-Length"] == str(len(ODD_JSON))


async def test_start_run_body_arriving_in_pieces_is_forwarded_whole(through, upstream) -> None:
    url = URL(await through(answer(200, {"run_id": "r1", "state": "queued"})))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"POST /v1/runs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(ODD_JSON), ODD_JSON[:9]))
    await writer.drain()
    await asyncio.sleep(0.05)  # the gateway has read the head and the first bytes by now
    writer.write(ODD_JSON[9:])
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    assert upstream.requests[0]["body"] == ODD_JSON


async def test_get_run_keeps_percent_encoded_path_and_query(through, upstream, http) -> None:
    url = await through()
    target = "/v1/runs/run%3A1%7E?cursor=a%2Fb%3D&x=%41"
    async with http.get(exact(url, target)) as resp:
        assert resp.status == 200
    assert [(r["method"], r["path"]) for r in upstream.requests] == [("GET", target)]


async def test_cancel_body_arriving_chunked_is_forwarded_whole_with_its_length(gateway, http) -> None:
    seen: list[tuple[str | None, str | None, bytes]] = []

    async def cancel(request: web.Request) -> web.StreamResponse:
        seen.append((request.headers.get("Content-Length"), request.headers.get("Transfer-Encoding"),
                     await request.read()))
        return json_response(200, {"run_id": request.match_info["run_id"], "state": "canceled"})

    app = web.Application()
    app.router.add_post("/v1/runs/{run_id}:cancel", cancel)
    runner, coordinator_url = await serve_app(app, handler_cancellation=True)
    rng = random.Random(7)
    chunks = [rng.randbytes(16 * 1024) for _ in range(16)]  # 256 KiB, under limits.max_body_bytes

    async def body():
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)  # a loop turn between chunks, so each goes out on its own

    try:
        url = await gateway(coordinator_url)
        async with http.post(url + "/v1/runs/r1:cancel", data=body(),
                             headers={"Content-Type": "application/octet-stream"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["state"] == "canceled"
    finally:
        await runner.cleanup()
    # The gateway frames what it forwards itself: the client's chunked framing never goes upstream.
    ((length, transfer_encoding, forwarded),) = seen
    assert forwarded == b"".join(chunks)
    assert (length, transfer_encoding) == (str(len(forwarded)), None)


async def test_cancel_body_over_the_limit_is_413_and_never_forwarded(gateway, upstream, http) -> None:
    upstream.route("POST", "/v1/runs/{run_id}:cancel", lambda r: json_response(200, {}))
    url = await gateway(await upstream.start(), limits={"max_body_bytes": 64 * 1024})

    async def body():
        for _ in range(64):  # 4 MiB, chunked: no Content-Length to refuse up front
            yield b"x" * 64 * 1024

    async with http.post(url + "/v1/runs/r1:cancel", data=body()) as resp:
        error = await envelope(resp, 413, "payload_too_large")
    assert error["details"]["max_body_bytes"] == 64 * 1024
    assert upstream.requests == []


# --------------------------------------------------------------------------- header hygiene

HOP_BY_HOP = ("Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Authorization", "Proxy-Authenticate",
              "Proxy-Connection")


async def test_hop_by_hop_request_headers_are_dropped(through, upstream) -> None:
    url = await through()
    body = json.dumps({"reason": "user"}).encode()
    status, _, _ = await raw_exchange(url, "POST", "/v1/runs/r1:cancel", [
        ("Connection", "close, X-Foo"), ("Connection", "x-bar"),
        ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Authenticate", "Basic"), ("Proxy-Connection", "keep-alive"),
        ("X-Foo", "named by Connection"), ("X-Bar", "named by the second Connection line"),
        ("X-Keep", "end-to-end"), ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked"),
    ], chunked(body))
    assert status == 200
    [seen] = upstream.requests
    sent = seen["headers"]
    for name in (*HOP_BY_HOP, "X-Foo", "X-Bar"):
        assert name not in sent, f"{name} reached the coordinator"
    assert "x-foo" not in sent.get("Connection", "").lower()
    assert sent.getall("Transfer-Encoding", []) in ([], ["chunked"])  # the gateway's own framing only
    assert sent["X-Keep"] == "end-to-end"
    assert seen["body"] == body


async def test_hop_by_hop_response_headers_are_dropped(through, http) -> None:
    async def noisy(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict([("Connection", "X-Foo"), ("Connection", "x-bar"), ("X-Foo", "1"),
                               ("X-Bar", "2"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                               ("Trailer", "X-Checksum"), ("Upgrade", "h2c"), ("Proxy-Authenticate", "Basic"),
                               ("Proxy-Authorization", "Basic eA=="), ("Proxy-Connection", "keep-alive"),
                               ("X-Keep", "end-to-end")])
        resp = await open_stream(request, headers)
        await resp.write(b'{"seq":0}\n')
        await resp.write_eof()
        return resp

    url = await through(noisy)
    async with http.get(url + "/v1/runs/r1/events") as resp:
        assert resp.status == 200
        assert await resp.read() == b'{"seq":0}\n'
        got = resp.headers
    for name in (*HOP_BY_HOP, "X-Foo", "X-Bar"):
        assert name not in got, f"{name} reached the client"
    assert "x-foo" not in got.get("Connection", "").lower()
    assert got.getall("Transfer-Encoding", []) in ([], ["chunked"])
    assert got["X-Keep"] == "end-to-end"


async def test_x_forwarded_headers_of_an_untrusted_peer_are_replaced(through, upstream) -> None:
    url = await through()
    status, _, _ = await raw_exchange(url, "GET", "/v1/runs/r1", [
        ("Host", "runs.example.com:8443"), ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.2"), ("X-Forwarded-Proto", "gopher"),
        ("X-Forwarded-Host", "evil.example")])
    assert status == 200
    sent = upstream.requests[0]["headers"]
    assert sent.getall("X-Forwarded-For") == ["127.0.0.1"]     # no listen.trusted_proxies: the peer is the client
    assert sent.getall("X-Forwarded-Proto") == ["http"]
    assert sent.getall("X-Forwarded-Host") == ["runs.example.com:8443"]
    assert sent["Host"] == URL(upstream.url).raw_authority


async def test_other_client_address_headers_never_reach_the_coordinator(through, upstream) -> None:
    # RFC 7239 Forwarded and X-Real-IP name a client address as X-Forwarded-For does; the gateway
    # vouches only for its own X-Forwarded-For, so a client cannot plant an address in another header.
    url = await through()
    status, _, _ = await raw_exchange(url, "GET", "/v1/runs/r1", [
        ("Host", "runs.example.com"), ("Forwarded", "for=203.0.113.7;proto=https"),
        ("X-Real-IP", "203.0.113.7"), ("X_Real_IP", "203.0.113.8")])
    assert status == 200
    sent = upstream.requests[0]["headers"]
    assert "Forwarded" not in sent and "X-Real-IP" not in sent and "X_Real_IP" not in sent
    assert sent.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_x_forwarded_for_is_the_peer_when_the_client_sends_none(through, upstream, http) -> None:
    url = await through()
    async with http.get(url + "/v1/runs/r1") as resp:
        assert resp.status == 200
    assert upstream.requests[0]["headers"].getall("X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.parametrize("given, kept", [
    (None, False),
    ("req-42.abc:DEF_9", True),
    ("has spaces in it", False),
    ("a" * 200, False),
    ("line\tbreak", False),
])
async def test_request_id_is_kept_when_safe_and_shared_with_the_coordinator(
        through, upstream, http, given: str | None, kept: bool) -> None:
    url = await through()
    headers = {"X-Request-ID": given} if given is not None else {}
    async with http.get(url + "/v1/runs/r1", headers=headers) as resp:
        assert resp.status == 200
        returned = resp.headers.getall("X-Request-ID")
    assert len(returned) == 1
    assert upstream.requests[0]["headers"].getall("X-Request-ID") == returned
    assert SAFE_ID.fullmatch(returned[0])
    assert (returned[0] == given) is kept


async def test_trace_context_passes_and_client_identity_headers_never_do(through, upstream, http) -> None:
    url = await through()
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
             "tracestate": "vendor=opaque,other=1"}
    forged = {"X-Auth-Subject": "admin", "X-Auth-Scopes": "runs:admin", "x-auth-issuer": "https://evil"}
    async with http.get(url + "/v1/runs/r1", headers={**trace, **forged}) as resp:
        assert resp.status == 200
    sent = upstream.requests[0]["headers"]
    assert {k: sent.getall(k) for k in trace} == {k: [v] for k, v in trace.items()}
    # Auth is disabled here: the gateway asserts its dev subject, never the client's claims.
    assert sent.getall("X-Auth-Subject") == ["dev"]
    assert "X-Auth-Scopes" not in sent and "X-Auth-Issuer" not in sent


# --------------------------------------------------------------------------- responses reach the client intact


async def test_response_status_headers_and_body_pass_through(through, http) -> None:
    async def created(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict([("X-Coordinator", "1"), ("Set-Cookie", "a=1; Path=/"),
                               ("Set-Cookie", "b=2; HttpOnly"), ("Cache-Control", "no-store")])
        return web.Response(status=201, reason="Created Here", body=b'{"run_id":"r1" ,"state":"queued"}',
                            content_type="application/vnd.arp+json", headers=headers)

    url = await through(created)
    async with http.post(url + "/v1/runs", json=RUN_START) as resp:
        assert (resp.status, resp.reason) == (201, "Created")  # the gateway's phrase, never the coordinator's
        assert resp.headers["X-Coordinator"] == "1"
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Content-Type"] == "application/vnd.arp+json"
        assert await resp.read() == b'{"run_id":"r1" ,"state":"queued"}'


async def test_gzip_bodies_pass_through_compressed(through, upstream, http) -> None:
    plain = json.dumps({"run_id": "r1", "state": "running", "pad": "x" * 5000}).encode()
    packed = gzip.compress(plain, mtime=0)

    async def compressed(request: web.Request) -> web.StreamResponse:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                                  "Vary": "Accept-Encoding"})

    url = await through(compressed)
    async with http.get(url + "/v1/runs/r1", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == packed
    assert upstream.requests[0]["headers"]["Accept-Encoding"] == "gzip"


def scripted_coordinator(answer: bytes) -> RawServer:
    """A coordinator that answers every request with exactly these bytes, written at once."""
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    return RawServer(write)


async def test_whole_answer_is_reframed_and_keeps_only_end_to_end_headers(gateway) -> None:
    body = b'{"run_id":"r1","state":"queued"}'
    server = scripted_coordinator(
        b"HTTP/1.1 201 Made\r\nConnection: X-Drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Transfer-Encoding: chunked\r\nX-Keep: end-to-end\r\nX-Request-ID: the-coordinator-s\r\n"
        b"Content-Type: application/json\r\n\r\n" + chunked(body))
    try:
        url = await gateway(await server.start())
        status, headers, got = await raw_exchange(url, "GET", "/v1/runs/r1", [("X-Request-ID", "mine-1")])
        await asyncio.sleep(1.05)  # a real second: the Date the listener adds reads time.time(), not an injected clock
        _, later, _ = await raw_exchange(url, "GET", "/v1/runs/r1")
    finally:
        await server.close()
    assert (status, got) == (201, body)
    assert headers["Content-Length"] == str(len(body))  # framed by the gateway for this hop
    for name in ("Transfer-Encoding", "X-Drop", "Keep-Alive"):
        assert name not in headers, f"{name} reached the client"
    assert headers["X-Keep"] == "end-to-end"
    assert headers.getall("X-Request-ID") == ["mine-1"]
    assert headers["Connection"] == "close"  # the client asked to close
    # The coordinator sent no Date; RFC 9110 has the proxy add one.
    first = parsedate_to_datetime(headers["Date"]).timestamp()
    assert abs(first - time.time()) < 5
    assert parsedate_to_datetime(later["Date"]).timestamp() > first, "a cached Date went stale"


async def test_http10_client_keeps_its_connection_for_whole_answers(gateway) -> None:
    server = scripted_coordinator(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    try:
        url = URL(await gateway(await server.start()))
        reader, writer = await asyncio.open_connection(url.host, url.port)
        for _ in range(2):  # the second request needs the connection the first one left open
            writer.write(b"GET /v1/runs/r1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
            assert head.startswith("HTTP/1.0 200 OK\r\n")
            assert "\r\nConnection: keep-alive\r\n" in head
            assert "\r\nContent-Length: 2\r\n" in head
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"{}"
        writer.close()
    finally:
        await server.close()


async def test_no_content_answer_has_no_body_or_length(gateway) -> None:
    server = scripted_coordinator(b"HTTP/1.1 204 No Content\r\nX-Keep: 1\r\n\r\n")
    try:
        url = URL(await gateway(await server.start()))
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"
                     b"GET /v1/runs/r1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)  # both answers, back to back
        writer.close()
    finally:
        await server.close()
    first, second = data.split(b"HTTP/1.1 204 No Content\r\n")[1:]
    assert b"Content-Length" not in first and first.endswith(b"\r\n\r\n")
    assert b"X-Keep: 1\r\n" in second and b"Connection: close\r\n" in second and second.endswith(b"\r\n\r\n")


async def test_coordinator_error_responses_pass_unchanged(gateway, coordinator, http) -> None:
    url = await gateway(coordinator)
    # 404 ErrorEnvelope: byte for byte what the coordinator says itself.
    async with http.get(coordinator + "/v1/runs/nope") as direct:
        direct_body = await direct.read()
    async with http.get(url + "/v1/runs/nope") as resp:
        assert (resp.status, resp.content_type) == (404, direct.content_type)
        assert await resp.read() == direct_body
        assert json.loads(direct_body)["error"]["code"] == "run_not_found"
    # 409 on a duplicate run id.
    start = {**RUN_START, "run_id": "dup-1"}
    async with http.post(url + "/v1/runs", json=start) as first:
        assert first.status == 200
    async with http.post(url + "/v1/runs", json=start) as again:
        assert again.status == 409
        assert (await again.json())["error"]["code"] == "run_exists"


async def test_coordinator_500_with_body_passes_unchanged(through, http) -> None:
    body = b'{"error":{"code":"internal_error","message":"boom","details":{"trace":"t-1"}}}'

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, body=body, headers={"Content-Type": "application/json"})

    url = await through(broken)
    async with http.get(url + "/v1/runs/r1") as resp:
        assert resp.status == 500
        assert await resp.read() == body


# --------------------------------------------------------------------------- streaming


async def test_each_ndjson_line_reaches_the_client_before_the_next_is_written(through, http) -> None:
    written: list[float] = []

    async def slow_lines(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        for seq in range(4):
            if seq:
                await asyncio.sleep(0.25)  # the coordinator's own pacing, against which relaying is timed
            written.append(time.monotonic())
            await resp.write(json.dumps({"seq": seq}).encode() + b"\n")
        await resp.write_eof()
        return resp

    url = await through(slow_lines)
    received: list[tuple[float, int]] = []
    async with asyncio.timeout(5), http.get(url + "/v1/runs/r1/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        while line := await resp.content.readline():
            received.append((time.monotonic(), json.loads(line)["seq"]))
    assert [seq for _, seq in received] == [0, 1, 2, 3]
    for seq in range(3):
        assert received[seq][0] < written[seq + 1], f"line {seq} was held back until line {seq + 1}"


async def test_dev_coordinator_events_arrive_as_they_happen(gateway, http) -> None:
    runner, coordinator_url = await devcoordinator.start(step_delay_s=0.2)
    try:
        url = await gateway(coordinator_url)
        async with http.post(url + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 200
            run_id = (await resp.json())["run_id"]
        lags, types = [], []
        async with asyncio.timeout(5), http.get(f"{url}/v1/runs/{run_id}/events") as resp:
            assert resp.status == 200
            while line := await resp.content.readline():
                event = json.loads(line)
                happened = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
                lags.append(time.time() - happened)
                types.append(event["type"])
    finally:
        await runner.cleanup()
    assert types[0] == "run_started" and types[-1] == "run_completed" and len(types) == 5
    # Events are 0.2 s apart; a relay that buffered would deliver some of them 0.2 s late or more.
    assert max(lags) < 0.15, lags


async def test_client_disconnect_closes_the_coordinator_stream(through, http) -> None:
    upstream_gone = asyncio.Event()

    async def forever(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        try:
            while True:
                await resp.write(b'{"type":"tick"}\n')
                await asyncio.sleep(0.1)  # a real coordinator ticking until its client goes away
        finally:
            upstream_gone.set()

    url = await through(forever)
    resp = await http.get(url + "/v1/runs/x/events")
    assert await asyncio.wait_for(resp.content.readline(), 2) == b'{"type":"tick"}\n'
    resp.close()
    await asyncio.wait_for(upstream_gone.wait(), 2)


async def drop_after(request: web.Request, resp: web.StreamResponse, *chunks: bytes) -> web.StreamResponse:
    """Writes `chunks`, then the coordinator vanishes: TCP reset, no terminating chunk."""
    for chunk in chunks:
        await resp.write(chunk)
    await asyncio.sleep(0.05)  # the chunks are on the wire before the reset
    request.transport.abort()
    await asyncio.sleep(10)  # cancelled once the server notices its connection is gone
    return resp


async def test_coordinator_dropping_a_chunked_stream_is_an_abnormal_end(through, http) -> None:
    async def drops(request: web.Request) -> web.StreamResponse:
        return await drop_after(request, await open_stream(request), b'{"seq":0}\n', b'{"seq":1}\n')

    url = await through(drops)
    lines = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(5), http.get(url + "/v1/runs/r1/events") as resp:
            assert resp.status == 200
            while line := await resp.content.readline():
                lines.append(line)
    assert lines == [b'{"seq":0}\n', b'{"seq":1}\n']


async def test_coordinator_cutting_a_content_length_body_short_is_an_abnormal_end(through, http) -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        return await drop_after(request, resp, b'{"run_id":"r1",' + b" " * 85)

    url = await through(short)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(5), http.get(url + "/v1/runs/r1") as resp:
            assert resp.status == 200
            await resp.read()


async def test_silent_stream_is_cut_after_the_idle_timeout(through, http) -> None:
    async def goes_silent(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        await resp.write(b'{"seq":0}\n')
        await asyncio.sleep(30)  # silent well past the (small) stream idle timeout
        return resp

    url = await through(goes_silent, upstream={"stream_idle_timeout_s": 0.5})
    started = time.monotonic()
    async with asyncio.timeout(5), http.get(url + "/v1/runs/r1/events") as resp:
        assert await resp.content.readline() == b'{"seq":0}\n'
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.readline()
    assert time.monotonic() - started < 3


async def test_long_lived_stream_with_regular_lines_is_not_cut(through, http) -> None:
    async def steady(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        for seq in range(10):
            await resp.write(json.dumps({"seq": seq}).encode() + b"\n")
            await asyncio.sleep(0.2)  # real gaps, each shorter than the real idle timeout
        await resp.write_eof()
        return resp

    # 2 s of stream against a 0.5 s idle timeout and a 0.5 s request timeout: neither is a total timeout.
    url = await through(steady, upstream={"stream_idle_timeout_s": 0.5, "request_timeout_s": 0.5})
    async with asyncio.timeout(6), http.get(url + "/v1/runs/r1/events") as resp:
        lines = [json.loads(line)["seq"] async for line in resp.content]
    assert lines == list(range(10))


# --------------------------------------------------------------------------- coordinator failures


async def test_no_coordinator_configured_is_503(gateway, http) -> None:
    url = await gateway(None)
    async with http.get(url + "/v1/runs/r1") as resp:
        error = await envelope(resp, 503, "run_coordinator_missing")
    assert error["retryable"] is False


@pytest.mark.parametrize("method, path", [("GET", "/v1/runs/r1"), ("POST", "/v1/runs")])
async def test_refused_connection_is_502_retryable(gateway, http, method: str, path: str) -> None:
    url = await gateway(f"http://127.0.0.1:{free_port()}")
    async with http.request(method, url + path, json=RUN_START if method == "POST" else None) as resp:
        error = await envelope(resp, 502, "run_coordinator_unavailable")
    assert error["retryable"] is True


async def test_slow_coordinator_is_504(through, http) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)  # outlasts the gateway's real request timeout
        return json_response(200, {})

    url = await through(slow, upstream={"request_timeout_s": 0.5})
    started = time.monotonic()
    async with http.get(url + "/v1/runs/r1") as resp:
        await envelope(resp, 504, "run_coordinator_timeout")
    assert 0.4 < time.monotonic() - started < 2


# --------------------------------------------------------------------------- retries


async def test_get_is_retried_on_503_until_it_succeeds(through, upstream, http) -> None:
    unavailable = answer(503, {"error": {"code": "unavailable", "message": "warming up"}})
    url = await through(sequence(unavailable, unavailable, answer(200, {"run_id": "r1", "state": "running"})))
    async with http.get(url + "/v1/runs/r1") as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "running"
    assert len(upstream.requests) == 3


async def test_start_run_answered_503_is_not_retried(through, upstream, http) -> None:
    body = {"error": {"code": "unavailable", "message": "busy"}}
    url = await through(answer(503, body))
    async with http.post(url + "/v1/runs", json=RUN_START) as resp:
        assert resp.status == 503
        assert await resp.json() == body  # the coordinator's own answer, unchanged
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("attempts", [1, 3])
async def test_retry_attempts_bound_upstream_hits(through, upstream, http, attempts: int) -> None:
    body = {"error": {"code": "bad_gateway", "message": "behind me"}}
    url = await through(answer(502, body), upstream=retries(attempts))
    async with http.get(url + "/v1/runs/r1") as resp:
        assert resp.status == 502
        assert await resp.json() == body  # the last answer is relayed, not released
    assert len(upstream.requests) == attempts


async def test_start_run_is_retried_while_the_coordinator_refuses_connections(gw, http) -> None:
    port = free_port()
    started: list[bytes] = []

    async def start_run(request: web.Request) -> web.StreamResponse:
        started.append(await request.read())
        return json_response(200, {"run_id": "r1", "state": "queued"})

    url = await gw(f"http://127.0.0.1:{port}",
                   upstream={"retries": {"attempts": 40, "backoff_initial_s": 0.05, "backoff_max_s": 0.1}})
    app = web.Application()
    app.router.add_post("/v1/runs", start_run)

    async def appear_later() -> web.AppRunner:
        await asyncio.sleep(0.3)  # the coordinator comes up while the gateway retries to connect
        return (await serve_app(app, port, handler_cancellation=True))[0]

    late = asyncio.create_task(appear_later())
    try:
        async with http.post(url + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 200, await resp.text()
    finally:
        await (await late).cleanup()
    assert started == [json.dumps(RUN_START).encode()]


async def hang_up(request: web.Request) -> web.StreamResponse:
    """The coordinator read the request, then closed the connection without a word."""
    request.transport.close()
    await asyncio.sleep(10)  # never answers; cancelled with its connection
    raise AssertionError("unreachable")


@pytest.mark.parametrize("method, path", [("POST", "/v1/runs"), ("POST", "/v1/runs/r1:cancel")])
async def test_post_is_sent_once_when_the_coordinator_hangs_up(through, upstream, http, method: str,
                                                               path: str) -> None:
    url = await through(hang_up)  # 3 retry attempts configured
    async with http.request(method, url + path, json=RUN_START) as resp:
        error = await envelope(resp, 502, "run_coordinator_unavailable")
    assert error["retryable"] is False  # it may have started (or cancelled) something
    assert len(upstream.requests) == 1  # a run is never started twice


async def test_get_is_retried_when_the_coordinator_hangs_up(through, upstream, http) -> None:
    url = await through(hang_up, upstream=retries(3))
    async with http.get(url + "/v1/runs/r1") as resp:
        error = await envelope(resp, 502, "run_coordinator_unavailable")
    assert error["retryable"] is True
    # aiohttp itself resends an idempotent request once on a dropped connection (RFC 9112 9.3.1),
    # inside each of the gateway's attempts: so between 3 and 6 requests, never unbounded.
    assert 3 <= len(upstream.requests) <= 6


# --------------------------------------------------------------------------- edge checks: never forwarded


async def test_body_over_the_limit_is_413(through, upstream, http) -> None:
    url = await through(limits={"max_body_bytes": 1024})
    big = json.dumps({**RUN_START, "input": {"pad": "x" * 2000}}).encode()
    async with http.post(url + "/v1/runs", data=big, headers={"Content-Type": "application/json"}) as resp:
        error = await envelope(resp, 413, "payload_too_large")
    assert error["details"]["max_body_bytes"] == 1024

    async def unsized():  # chunked: no Content-Length to reject up front
        for i in range(0, len(big), 256):
            yield big[i:i + 256]

    async with http.post(url + "/v1/runs", data=unsized(), headers={"Content-Type": "application/json"}) as resp:
        await envelope(resp, 413, "payload_too_large")
    assert upstream.requests == []


async def test_non_json_start_run_is_415(through, upstream, http) -> None:
    url = await through()
    async with http.post(url + "/v1/runs", data=json.dumps(RUN_START), headers={"Content-Type": "text/plain"}) as resp:
        await envelope(resp, 415, "unsupported_media_type")
    assert upstream.requests == []


async def test_invalid_run_start_lists_every_problem(through, upstream, http) -> None:
    url = await through()
    async with http.post(url + "/v1/runs", json={"input": "not an object", "bogus": 1}) as resp:
        error = await envelope(resp, 400, "invalid_request")
    assert sorted(p["path"] for p in error["details"]["errors"]) == ["bogus", "input", "root_node_type_ref"]
    assert upstream.requests == []


@pytest.mark.parametrize("method, target", [
    ("GET", "/v1/node-runs"),
    ("POST", "/v1/node-runs"),
    ("GET", "/v1/runs/x/../../node-runs"),
    ("GET", "/v1/runs/..%2Fnode-runs"),
    ("GET", "/v1/runs/%2E%2E/events"),
    ("GET", "/v1/runs/a%2Fb"),
])
async def test_unknown_routes_are_404_and_never_forwarded(through, upstream, method: str, target: str) -> None:
    url = await through()
    status, headers, body = await raw_exchange(url, method, target)
    check_envelope(status, headers, body, 404, "not_found")
    assert upstream.requests == []


@pytest.mark.parametrize("method, target, allow", [
    ("DELETE", "/v1/runs", "POST"),
    ("GET", "/v1/runs/x:cancel", "POST"),
    ("PUT", "/v1/runs/x", "GET"),
])
async def test_wrong_method_is_405_with_allow(through, upstream, http, method: str, target: str,
                                              allow: str) -> None:
    url = await through()
    async with http.request(method, url + target) as resp:
        await envelope(resp, 405, "method_not_allowed")
        assert resp.headers["Allow"] == allow
    assert upstream.requests == []


async def test_a_second_answer_on_a_reused_connection_is_dropped_and_the_first_one_relayed(gateway) -> None:
    """On a pooled connection (the callback path), a coordinator that answers one request twice: the
    client gets the first answer at once, and the next request goes out on a fresh connection."""
    answers = 0

    async def answer(writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        answers += 1
        body = b'{"n": %d}' % answers
        one = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        writer.write(one + (b"HTTP/1.1 200 OK\r\nX-Forged: 1\r\nContent-Length: 0\r\n\r\n" if answers == 2 else b""))
        await writer.drain()

    server = RawServer(answer)
    try:
        url = await gateway(await server.start(), upstream={"request_timeout_s": 5})
        first = await raw_exchange(url, "GET", "/v1/runs/r1")
        started = time.monotonic()
        status, headers, body = await raw_exchange(url, "GET", "/v1/runs/r2")
        assert (status, json.loads(body)) == (200, {"n": 2}) and "X-Forged" not in headers
        assert time.monotonic() - started < 2, "the answer waited for the request timeout"
        assert json.loads((await raw_exchange(url, "GET", "/v1/runs/r3"))[2]) == {"n": 3}
    finally:
        await server.close()
    assert first[0] == 200
    assert server.connections == 2  # r1 and r2 shared one connection; r3 needed a new one
