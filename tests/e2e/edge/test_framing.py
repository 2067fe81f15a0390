"""Framing at the edge, case by case: what the coordinator receives for each hostile or odd request.

Every test writes raw bytes to a gateway on loopback in front of the strict
h11 coordinator of tests/support/recording.py and asserts what a client sees
(status, ErrorEnvelope, request id) and what the coordinator parsed (nothing,
for a refused request; exactly the client's bytes, for an accepted one).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START, gateway_config
from tests.support.rawhttp import RawConnection, Response, chunked, gzip_bytes, request
from tests.support.recording import strict_upstream  # noqa: F401  (fixture)
from tests.support.servers import RawServer

RUN_START_BODY = json.dumps(RUN_START).encode()
SMUGGLED = (b"GET /v1/node-runs/secret HTTP/1.1\r\nHost: c\r\nX-Auth-Subject: admin\r\n"
            b"Content-Length: 0\r\n\r\n")
JSON = ("Content-Type", "application/json")
UNREACHABLE_AUTH = {"mode": "required", "issuers": [{"issuer": "http://127.0.0.1:9/idp", "audiences": ["a"],
                                                     "jwks_uri": "http://127.0.0.1:9/jwks"}]}


async def one(url: str, data: bytes, *, method: str = "GET") -> tuple[Response | None, bool]:
    """Sends `data` on a fresh connection; the first answer, and whether the gateway then closed."""
    async with await RawConnection.open(url) as conn:
        await conn.send(data)
        resp = await conn.response(method=method)
        closed = resp is None or resp.closes and await conn.closed_by_peer()
        return resp, closed


def refused(resp: Response | None, status: int | set[int], code: str | None = None) -> dict[str, Any]:
    """A gateway-made ErrorEnvelope whose details.request_id is the X-Request-ID header."""
    assert resp is not None, "the gateway closed without an answer"
    statuses = {status} if isinstance(status, int) else status
    assert resp.status in statuses, resp.describe()
    error = resp.envelope()
    assert error is not None, f"not an ErrorEnvelope with a matching request id: {resp.describe()}"
    if code is not None:
        assert error["code"] == code, resp.describe()
    return error


# --------------------------------------------------------------------------- content encodings


async def test_gzip_get_body_hiding_a_request_is_refused_and_nothing_is_forwarded(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    body = gzip_bytes(SMUGGLED)
    resp, _ = await one(url, request("GET", "/v1/runs/r1", [("Content-Encoding", "gzip")], body))
    refused(resp, 400, "invalid_request")
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == [] and strict_upstream.violations == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "x-gzip", "GZIP", "identity, gzip"])
async def test_start_run_with_a_content_encoding_is_415(gateway, strict_upstream, coding):
    url = await gateway(strict_upstream.url)
    resp, _ = await one(url, request("POST", "/v1/runs", [JSON, ("Content-Encoding", coding)],
                                     gzip_bytes(RUN_START_BODY)))
    refused(resp, 415, "unsupported_media_type")
    assert strict_upstream.requests == []


async def test_start_run_with_identity_encoding_is_forwarded(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    resp, _ = await one(url, request("POST", "/v1/runs", [JSON, ("Content-Encoding", "identity")], RUN_START_BODY))
    assert resp is not None and resp.status == 200, resp and resp.describe()
    (rec,) = strict_upstream.requests
    assert rec.body == RUN_START_BODY


async def test_cancel_with_a_gzip_body_is_forwarded_compressed_and_labelled(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    body = gzip_bytes(SMUGGLED)
    resp, _ = await one(url, request("POST", "/v1/runs/r1:cancel", [JSON, ("Content-Encoding", "gzip")], body))
    assert resp is not None and resp.status == 200, resp and resp.describe()
    (rec,) = strict_upstream.requests
    assert (rec.method, rec.target, rec.body) == (b"POST", b"/v1/runs/r1:cancel", body)
    assert rec.all("Content-Encoding") == [b"gzip"]
    assert rec.one("Content-Length") == b"%d" % len(body)


# --------------------------------------------------------------------------- bodies where none belongs, limits


@pytest.mark.parametrize("target", ["/v1/runs/r1", "/v1/runs/r1/events"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_get_with_a_body_is_400_and_not_forwarded(gateway, strict_upstream, target, framing):
    url = await gateway(strict_upstream.url)
    data = request("GET", target, [], b"{}") if framing == "length" else \
        request("GET", target, [("Transfer-Encoding", "chunked")], chunked(b"{}"))
    resp, _ = await one(url, data)
    refused(resp, 400, "invalid_request")
    assert strict_upstream.requests == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_cancel_body_over_the_limit_is_413_and_not_forwarded(gateway, strict_upstream, framing):
    url = await gateway(strict_upstream.url, limits={"max_body_bytes": 1024})
    body = b"x" * 1025
    data = request("POST", "/v1/runs/r1:cancel", [JSON], body) if framing == "length" else \
        request("POST", "/v1/runs/r1:cancel", [JSON, ("Transfer-Encoding", "chunked")],
                chunked(body, [500, 500, 25]))
    resp, _ = await one(url, data, method="POST")
    refused(resp, 413, "payload_too_large")
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == [] and strict_upstream.violations == []


async def test_cancel_body_at_the_limit_is_forwarded(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, limits={"max_body_bytes": 1024})
    body = b"y" * 1024
    resp, _ = await one(url, request("POST", "/v1/runs/r1:cancel", [JSON, ("Transfer-Encoding", "chunked")],
                                     chunked(body, [1000])), method="POST")
    assert resp is not None and resp.status == 200, resp and resp.describe()
    assert [r.body for r in strict_upstream.requests] == [body]


async def test_chunked_body_arrives_dechunked_with_its_length_and_without_trailers(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    body = b'{"reason": "' + b"z" * 3000 + b'"}'
    wire = chunked(body, [1, 2, 1000, 7], ext=b';name="v;1"',
                   trailers=[(b"X-Trailer-Probe", b"t"), (b"X-Auth-Subject", b"trailer-admin")])
    resp, _ = await one(url, request("POST", "/v1/runs/r1:cancel", [JSON, ("Transfer-Encoding", "chunked")], wire),
                        method="POST")
    assert resp is not None and resp.status == 200, resp and resp.describe()
    (rec,) = strict_upstream.requests
    assert rec.body == body
    assert rec.one("Content-Length") == b"%d" % len(body)
    assert rec.all("Transfer-Encoding") == [] and rec.all("X-Trailer-Probe") == []
    assert b"trailer-admin" not in b" ".join(v for _, v in rec.headers)


# --------------------------------------------------------------------------- request ids


async def test_the_request_id_the_client_sees_is_the_one_the_coordinator_got(gateway, strict_upstream):
    url = await gateway(strict_upstream.url)
    resp, _ = await one(url, request("GET", "/v1/runs/r1"))
    assert resp is not None and resp.status == 200
    (rec,) = strict_upstream.requests
    assert resp.request_id and rec.one("X-Request-ID") == resp.request_id.encode()


# --------------------------------------------------------------------------- unrequested coordinator answers


def _answer(n: int, extra: bytes = b"") -> bytes:
    body = b'{"n": %d}' % n
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s%s" % (
        len(body), body, extra)


SECOND = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{"smuggled":true}'


@pytest.mark.parametrize("when", ["same write", "later, on the idle connection"])
async def test_an_unrequested_second_answer_is_never_relayed_and_its_connection_is_dropped(gateway, when):
    answers = 0

    async def answer(writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        answers += 1
        if answers == 1 and when == "same write":
            writer.write(_answer(1, SECOND))
        elif answers == 1:
            writer.write(_answer(1))
            await writer.drain()
            await asyncio.sleep(0.2)  # the late bytes come in a separate real read
            writer.write(SECOND)
        else:
            writer.write(_answer(answers))
        await writer.drain()

    server = RawServer(answer)
    url = await gateway(await server.start())
    try:
        async with await RawConnection.open(url) as conn:
            await conn.send(request("GET", "/v1/runs/r1"))
            first = await conn.response()
            assert first is not None and first.json() == {"n": 1}
            await asyncio.sleep(0.5)  # the late answer has arrived by now
            await conn.send(request("GET", "/v1/runs/r2"))
            second = await conn.response()
            assert second is not None and second.json() == {"n": 2}, second and second.describe()
        async with await RawConnection.open(url) as conn:
            await conn.send(request("GET", "/v1/runs/r3"))
            third = await conn.response()
            assert third is not None and third.json() == {"n": 3}, third and third.describe()
        assert len(server.requests) == 3
        assert server.connections >= 2, "the connection that carried an unrequested answer was reused"
    finally:
        await server.close()


# --------------------------------------------------------------------------- request targets

GOOD_TARGETS = [
    ("GET", b"/v1/runs/r1?a=b/c?d"),
    ("GET", b"/v1/runs/r!$&'()*+,;=:@-._~%41"),
    ("GET", b"/v1/runs/%7e%7E/events?x=%2F%3f&y=:@!$'()*+,;="),
    ("POST", b"/v1/runs/run%3A1:cancel?q="),
    ("GET", b"/v1/runs/r1?"),
]


@pytest.mark.parametrize("method,target", GOOD_TARGETS)
async def test_targets_of_rfc3986_characters_are_forwarded_byte_exact(gateway, strict_upstream, method, target):
    url = await gateway(strict_upstream.url)
    resp, _ = await one(url, request(method, target, [("Content-Length", "0")] if method == "POST" else []),
                        method=method)
    assert resp is not None and resp.status == 200, resp and resp.describe()
    (rec,) = strict_upstream.requests
    assert rec.target == target


BAD_TARGETS = [
    b"/v1/runs/r1#frag", b"/v1/runs/r1?x=1#", b"/v1/runs/r\xc3\xa9", b"/v1/runs/r\x01x", b"/v1/runs/r\x7f",
    b"/v1/runs/r\x00", b"/v1/runs/r\tx", b"/v1/runs/a\\b", b"/v1/runs/%zz", b"/v1/runs/r%4", b"/v1/runs/r1?q=%g1",
    b"http://c/v1/runs/r1", b"http://127.0.0.1/v1/runs/r1", b"*", b"/v1/runs/a<b>", b"/v1/runs/{x}",
    b"/v1/runs/a|b", b"/v1/runs/a b", b"/v1/runs/r1?a=[1]", b'/v1/runs/"q"', b"v1/runs/r1",
]


@pytest.mark.parametrize("target", BAD_TARGETS, ids=[repr(t)[2:-1] for t in BAD_TARGETS])
async def test_other_targets_are_400_before_auth_and_never_forwarded(gateway, strict_upstream, target):
    url = await gateway(strict_upstream.url, auth=UNREACHABLE_AUTH)
    resp, _ = await one(url, request("GET", target))
    refused(resp, 400, "invalid_request")
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == [] and strict_upstream.violations == []


async def test_a_good_target_without_a_token_is_401_so_auth_is_on(gateway, strict_upstream):
    url = await gateway(strict_upstream.url, auth=UNREACHABLE_AUTH)
    resp, _ = await one(url, request("GET", "/v1/runs/r1"))
    refused(resp, 401)


# --------------------------------------------------------------------------- parser refusals

PARSER_REFUSALS = [
    ("CL and TE", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("TE and CL", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 5\r\n\r\nhello", {400}),
    ("differing CLs", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                      b"Content-Length: 6\r\n\r\nhello!", {400}),
    ("CL list", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\nhello!", {400}),
    ("signed CL", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello", {400}),
    # Dropping the gzip coding would hand the coordinator compressed bytes as if they were the body.
    ("gzip, chunked", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                      + chunked(gzip_bytes(b'{"reason": "x"}')), {400, 501}),
    ("chunked, gzip", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
                      b"0\r\n\r\n", {400, 501}),
    ("bad chunk size", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0x5\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk size overflow", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"100000000000000000001\r\nx\r\n0\r\n\r\n", {400, 413}),
    ("space before colon", b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\nhello",
     {400}),
    ("invalid header name", b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX Bad: v\r\n\r\n", {400}),
    ("NUL in a header value", b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", {400}),
    ("unknown method", b"FOO /v1/runs/r1 HTTP/1.1\r\nHost: h\r\n\r\n", {400, 405, 501}),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 501, 505}),
    # A TLS ClientHello: llhttp reads its first bytes as an unknown method.
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, {400, 501}),
]


@pytest.mark.parametrize("data,statuses", [p[1:] for p in PARSER_REFUSALS], ids=[p[0] for p in PARSER_REFUSALS])
async def test_parser_refusals_are_error_envelopes_that_close_the_connection(gateway, strict_upstream, data,
                                                                             statuses):
    url = await gateway(strict_upstream.url)
    resp, closed = await one(url, data)
    refused(resp, statuses)
    assert resp is not None and resp.closes and closed, resp.describe()
    await asyncio.sleep(0.05)  # had anything been forwarded, the coordinator would have it by now
    assert strict_upstream.requests == [] and strict_upstream.violations == []


@pytest.mark.parametrize("data", [
    b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET /v1/runs/r1 HTTP/1.1\nHost: h\nX-A: b\n\n",
    b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n",
], ids=["obs-fold", "bare LF everywhere", "one bare LF"])
async def test_obs_fold_and_bare_lf_are_refused_cleanly_or_forwarded_clean(gateway, strict_upstream, data):
    url = await gateway(strict_upstream.url)
    resp, closed = await one(url, data)
    assert resp is not None
    if resp.header("X-Upstream-Seq") is None:
        refused(resp, 400)
        assert resp.closes and closed
        assert strict_upstream.requests == []
    else:
        (rec,) = strict_upstream.requests
        assert all(b"\r" not in v and b"\n" not in v for _, v in rec.headers)
    assert strict_upstream.violations == []


@pytest.mark.parametrize("data,status", [
    (b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET /v1/runs/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", {400, 414, 431}),
], ids=["one huge header", "101 header lines", "huge target"])
async def test_oversized_heads_are_refused_with_an_envelope(gateway, strict_upstream, data, status):
    url = await gateway(strict_upstream.url)
    resp, closed = await one(url, data)
    refused(resp, status)
    assert resp is not None and resp.closes and closed
    assert strict_upstream.requests == []


async def test_100_header_lines_are_accepted(gateway, strict_upstream):
    # 98 own + Host + X-Request-ID: exactly the default limit of 100.
    url = await gateway(strict_upstream.url)
    headers = [(f"X-H{i}", "v") for i in range(98)] + [("X-Request-ID", "hundred")]
    resp, _ = await one(url, request("GET", "/v1/runs/r1", headers))
    assert resp is not None and resp.status == 200, resp and resp.describe()


# --------------------------------------------------------------------------- refused requests are observable

ACCESS_LINE = re.compile(r'^\{.*"type":"access".*\}$')


async def test_every_refused_request_is_logged_and_counted(capfd, strict_upstream):
    # Started and stopped inside the test: the access log must flush while capfd still captures.
    server, url = await start_gateway(gateway_config(strict_upstream.url, metrics={"enabled": True, "port": 0},
                                                     logging={"access_log": True}))
    try:
        await _refusals_are_logged_and_counted(url, capfd)
    finally:
        await server.cleanup()


async def _refusals_are_logged_and_counted(url: str, capfd: Any) -> None:
    capfd.readouterr()
    refusals = [b"POST /v1/runs/r1:cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET /v1/runs/r1 HTTP/1.1\r\nHost: h\r\nX Bad: v\r\n\r\n",
                request("GET", b"/v1/runs/r1#x"),
                request("GET", "/v1/node-runs/x")]
    ids = []
    for data in refusals:
        resp, _ = await one(url, data)
        ids.append(refused(resp, {400, 404})["details"]["request_id"])
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while not {line.get("request_id") for line in lines} >= set(ids):
            await asyncio.sleep(0.1)  # the access log is flushed on a real loop timer
            lines += [json.loads(line) for line in capfd.readouterr().out.splitlines() if ACCESS_LINE.match(line)]
    for rid in ids:
        (line,) = [line for line in lines if line.get("request_id") == rid]
        assert line["status"] in (400, 404) and line["route"] == "unmatched"
    resp, _ = await one(url, request("GET", "/metrics"))
    assert resp is not None and resp.status == 200
    counted = sum(float(m.group(1)) for m in re.finditer(
        rb'^arp_gateway_requests_total\{[^}]*route="unmatched"[^}]*\} (\S+)$', resp.body, re.M))
    assert counted >= len(refusals), resp.body.decode()[:2000]
