"""The framing property, for generated requests: the coordinator receives exactly what the gateway accepted.

Hypothesis generates pipelines of 1-4 hand-framed requests (Content-Length and
Transfer-Encoding variants, valid and hostile; chunk sizes, extensions and
trailers, valid and oversized; Content-Encoding with gzip bodies hiding a whole request; odd
targets; header names with `_`; spoofed identity headers) and writes each
pipeline in one write to a gateway in front of a strict h11 coordinator.

From the client side alone it works out which requests the gateway accepted
(answers carrying the coordinator's sequence header) and which it refused
(ErrorEnvelopes whose request id matches the X-Request-ID header), then
asserts that the coordinator parsed exactly the accepted ones, in order, each
with the request id the client saw, its method and raw target, the body the
client sent (de-chunked) under a Content-Length equal to its size, no
Transfer-Encoding, no client identity header, no trailer as a header, and no
byte it could not parse. Contract expectations (a CL+TE request is refused and
the connection closed, a GET with a body is 400, ...) are checked per request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.edge.protocol import MAX_PIPELINED
from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START, gateway_config
from tests.support.loopthread import LoopThread
from tests.support.rawhttp import RawConnection, Response, gzip_bytes
from tests.support.recording import SEQ_HEADER, StrictUpstream
from tests.support.threadidp import ThreadIdp

AUD = "arp-edge-property"
RUN_START_BODY = json.dumps(RUN_START).encode()
# The attack of issue 9: a GET whose gzip body inflates to a whole second request.
SMUGGLED = (b"GET /v1/node-runs/secret HTTP/1.1\r\nHost: c\r\nX-Auth-Subject: admin\r\n"
            b"Content-Length: 0\r\n\r\n")
SPOOF = b"spoofed-admin"
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
_ids = itertools.count(1)

# RFC 3986 pchar minus pct-encoded (generated separately), and minus nothing else.
PCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@"


@dataclass
class Req:
    method: bytes
    target: bytes
    headers: list[bytes]            # whole header lines (no CRLF), framing included
    wire_body: bytes                # the bytes after the head, as framed on the wire
    body: bytes                     # what the coordinator must receive if this is accepted
    # Refusals as (statuses, error code or None for any): `hard` ones the contract demands (any one of
    # them will do), `soft` ones it allows (framing RFC 9112 lets a server take or refuse).
    hard: list[tuple[frozenset[int], str | None]] = field(default_factory=list)
    soft: list[tuple[frozenset[int], str | None]] = field(default_factory=list)
    framing_error: bool = False     # the parser must refuse it, and then close: the next request's start is lost
    want_status: int = 200
    rid: str = ""
    trailer_names: list[bytes] = field(default_factory=list)
    content_encoding: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def refusals(self) -> list[tuple[frozenset[int], str | None]]:
        return self.hard + self.soft

    def wire(self, last: bool) -> bytes:
        lines = [self.method + b" " + self.target + b" HTTP/1.1", b"Host: gateway.test",
                 b"X-Request-ID: " + self.rid.encode(), *self.headers]
        if last:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.wire_body


# --------------------------------------------------------------------------- strategies


@st.composite
def run_ids(draw: Any) -> bytes:
    first = draw(st.sampled_from("abcrRZ0"))
    rest = draw(st.lists(st.one_of(st.sampled_from(PCHAR),
                                   st.sampled_from(["%41", "%7e", "%20", "%C3%A9", "%3A", "%25"])),
                         max_size=10))
    return (first + "".join(rest)).encode()


@st.composite
def queries(draw: Any) -> bytes:
    if not draw(st.booleans()):
        return b""
    chars = st.one_of(st.sampled_from(PCHAR + "/?"), st.sampled_from(["%2F", "%3f", "%00"]))
    return b"?" + "".join(draw(st.lists(chars, max_size=12))).encode()


BAD_TARGETS = [
    (b"/v1/runs/r1#frag", "fragment"), (b"/v1/runs/r1?x=1#y", "fragment in query"),
    (b"/v1/runs/r\xc3\xa9", "raw non-ASCII"), (b"/v1/runs/r\x01x", "control character"),
    (b"/v1/runs/r\x7fx", "DEL"), (b"/v1/runs/r\x00x", "NUL"), (b"/v1/runs/r\tx", "tab"),
    (b"/v1/runs/a\\b", "backslash"), (b"/v1/runs/%zz", "invalid escape"), (b"/v1/runs/r%4", "short escape"),
    (b"/v1/runs/r1?q=%g1", "invalid escape in query"), (b"http://c/v1/runs/r1", "absolute-form, authority not the Host"),
    (b"*", "asterisk-form"), (b"/v1/runs/a<b>", "angle brackets"), (b'/v1/runs/"q"', "quote"),
    (b"/v1/runs/{x}", "braces"), (b"/v1/runs/a|b", "pipe"), (b"/v1/runs/a^b", "caret"),
    (b"/v1/runs/a`b", "backtick"), (b"/v1/runs/a b", "space"), (b"/v1/runs/r1?a=[1]", "brackets in query"),
]


def _ows() -> st.SearchStrategy[bytes]:
    return st.sampled_from([b"", b" ", b"\t", b"  ", b" \t"])


def _name(canonical: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([canonical, canonical.lower(), canonical.upper(),
                            bytes(c ^ 32 if i % 2 and chr(c).isalpha() else c for i, c in enumerate(canonical))])


@st.composite
def valid_length(draw: Any, body: bytes) -> tuple[list[bytes], bytes, list[str]]:
    line = draw(_name(b"Content-Length")) + b":" + draw(_ows()) + b"%d" % len(body) + draw(_ows())
    return [line], body, ["content-length"]


@st.composite
def chunked_wire(draw: Any, body: bytes, *, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
    out = bytearray()
    pos = 0
    ext = draw(st.sampled_from([b"", b";a=b", b";a", b';a="b c"', b";a=b;c=d", b";x-long=" + b"v" * 40]))
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        hexsize = (b"%x" if draw(st.booleans()) else b"%X") % size
        out += b"0" * draw(st.integers(0, 2)) + hexsize + ext + b"\r\n" + body[pos:pos + size] + b"\r\n"
        pos += size
    out += draw(st.sampled_from([b"0", b"000"])) + ext + b"\r\n"
    out += b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    return bytes(out)


@st.composite
def valid_chunked(draw: Any, body: bytes) -> tuple[list[bytes], bytes, list[str], list[bytes]]:
    trailers = draw(st.sampled_from([[], [(b"X-Trailer-Probe", b"1")], [(b"X-Auth-Subject", SPOOF)],
                                     [(b"X-Trailer-Probe", b"1"), (b"Content-Length", b"999")]]))
    value = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))
    trailing = draw(_ows())
    line = draw(_name(b"Transfer-Encoding")) + b":" + draw(_ows()) + value + trailing
    notes = ["chunked"] + (["TE with trailing tab"] if b"\t" in trailing else [])
    return [line], draw(chunked_wire(body, trailers=trailers)), notes, [n.lower() for n, _ in trailers]


@st.composite
def oversized_trailers(draw: Any, body: bytes) -> tuple[list[bytes], bytes, str]:
    """A chunked body whose trailer section passes limits.max_header_bytes (64 KiB) or, with the
    head's fields, limits.max_headers (100): refused with 431 like an oversized head."""
    why, trailers = draw(st.sampled_from([
        ("one 70 KB trailer field", [(b"X-Big", b"v" * 70_000)]),
        ("many small trailer fields of 70 KB in all", [(b"X-T-%d" % i, b"w" * 700) for i in range(99)]),
        ("101 trailer fields", [(b"X-T-%d" % i, b"1") for i in range(101)]),
    ]))
    return [b"Transfer-Encoding: chunked"], draw(chunked_wire(body, trailers=trailers)), why


@st.composite
def bad_framing(draw: Any, body: bytes) -> tuple[list[bytes], bytes, str, bool]:
    """(framing lines, wire body, why, maybe): framing the gateway must refuse (when maybe: may accept).
    Unless `why` is in KNOWN_BOUNDARY, the refusal must also close: the next request's start is unknown."""
    n = len(body)
    chunks = draw(chunked_wire(body))
    options = [
        ([b"Content-Length: %d" % n, b"Transfer-Encoding: chunked"], chunks, "CL+TE", False),
        ([b"Transfer-Encoding: chunked", b"Content-Length: %d" % n], chunks, "TE+CL", False),
        ([b"Transfer-Encoding: chunked", b"Content-Length: %d" % n], body, "TE+CL, CL-framed body", False),
        ([b"Content-Length: %d" % n, b"Content-Length: %d" % (n + 1)], body, "differing duplicate CL", False),
        ([b"Content-Length: %d, %d" % (n, n + 1)], body, "differing CL list", False),
        ([b"Content-Length: +%d" % n], body, "CL with sign", False),
        ([b"Content-Length: 0x%x" % n], body, "hex CL", False),
        ([b"Content-Length: %d %d" % (n, n)], body, "CL with inner space", False),
        ([b"Content-Length: -1"], body, "negative CL", False),
        ([b"Content-Length: 99999999999999999999999"], body, "overflowing CL", False),
        ([b"Content-Length : %d" % n], body, "space before colon (CL)", False),
        ([b"Transfer-Encoding : chunked"], chunks, "space before colon (TE)", False),
        ([b"Transfer-Encoding: gzip, chunked"], draw(chunked_wire(gzip_bytes(body))), "gzip, chunked", False),
        ([b"Transfer-Encoding: chunked, gzip"], chunks, "chunked not last", False),
        ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"], chunks, "chunked not last (two lines)",
         False),
        ([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], draw(chunked_wire(gzip_bytes(body))),
         "gzip, chunked (two lines)", False),
        ([b"Transfer-Encoding: gzip"], body, "gzip only", False),
        ([b"Transfer-Encoding: identity"], body, "identity TE", False),
        ([b"Transfer-Encoding: chunkedx"], chunks, "unknown coding", False),
        ([b"Transfer-Encoding: xchunked"], chunks, "unknown coding", False),
        ([b"Transfer-Encoding: chunked"], b"0x%x\r\n%s\r\n0\r\n\r\n" % (n, body), "0x chunk size", False),
        ([b"Transfer-Encoding: chunked"], b"-%x\r\n%s\r\n0\r\n\r\n" % (n, body), "negative chunk size", False),
        ([b"Transfer-Encoding: chunked"], b" %x\r\n%s\r\n0\r\n\r\n" % (n, body), "space before chunk size",
         False),
        ([b"Transfer-Encoding: chunked"], b"1" + b"0" * 20 + b"\r\nab\r\n0\r\n\r\n", "chunk size overflow",
         False),
        ([b"Transfer-Encoding: chunked"], b"%x\r\n%sXY0\r\n\r\n" % (n, body), "chunk without CRLF", False),
        ([b"Transfer-Encoding: chunked"], b"%x;\x01\r\n%s\r\n0\r\n\r\n" % (n, body), "control in chunk ext",
         False),
        ([b"Content-Length: %d" % n, b"Content-Length: %d" % n], body, "identical duplicate CL", True),
        ([b"Content-Length: %d, %d" % (n, n)], body, "identical CL list", True),
        ([b"Transfer-Encoding: chunked"], b"%x ;a=b\r\n%s\r\n0\r\n\r\n" % (n, body), "BWS in chunk ext", True),
    ]
    return draw(st.sampled_from(options))


# Refused framings whose end is still certain (chunked is the last coding): closing is not required.
KNOWN_BOUNDARY = {"gzip, chunked", "gzip, chunked (two lines)"}

BAD_HEADERS = [
    (b"X Bad: v", "space in header name", False), (b'X"Q: v', "quote in header name", False),
    (b": v", "empty header name", False), (b"X-\x01: v", "control in header name", False),
    (b"X-Ok: a\r\n folded", "obs-fold", True), (b"X-Ok: a\x00b", "NUL in header value", False),
    (b"X-Ok: v\nX-Next: w", "bare LF between headers", True), (b"X-Ok\xff: v", "non-ASCII header name", False),
]
SPOOFS = [b"X-Auth-Subject", b"x-auth-subject", b"X_Auth_Subject", b"X-AUTH_Scopes", b"X_AUTH_ISSUER",
          b"x-auth-issuer", b"X-Auth-Tenant"]


@st.composite
def requests(draw: Any, *, token: str | None, clean: bool = False) -> Req:
    """One request; `clean`: only kinds and framings the contract accepts."""
    kind = draw(st.sampled_from(["get", "events", "cancel", "start"] if clean else
                                ["get", "events", "cancel", "start", "get_body", "start_gzip", "cancel_gzip",
                                 "smuggle", "unknown", "bad_target"]))
    rid = f"edge-{next(_ids)}"
    run = draw(run_ids())
    headers: list[bytes] = []
    req = Req(b"GET", b"/v1/runs/" + run + draw(queries()), headers, b"", b"", rid=rid)
    body = b""
    if kind == "events":
        req.target = b"/v1/runs/" + run + b"/events"
    elif kind in ("cancel", "cancel_gzip"):
        req.method, req.target = b"POST", b"/v1/runs/" + run + b":cancel"
        body = draw(st.binary(max_size=300)) if kind == "cancel" else gzip_bytes(SMUGGLED)
        if kind == "cancel_gzip":
            req.content_encoding = b"gzip"
            headers.append(b"Content-Encoding: gzip")
    elif kind in ("start", "start_gzip"):
        req.method, req.target, body = b"POST", b"/v1/runs", RUN_START_BODY
        headers.append(b"Content-Type: application/json")
        if kind == "start_gzip":
            coding = draw(st.sampled_from([b"gzip", b"deflate", b"br", b"gzip, identity", b"GZIP", b"x-gzip"]))
            body = gzip_bytes(body)
            headers.append(b"Content-Encoding: " + coding)
            req.hard.append((frozenset({415}), "unsupported_media_type"))
    elif kind in ("get_body", "smuggle"):
        req.target = b"/v1/runs/r1"
        body = draw(st.binary(min_size=1, max_size=64)) if kind == "get_body" else gzip_bytes(SMUGGLED)
        if kind == "smuggle":
            headers.append(b"Content-Encoding: gzip")
        req.hard.append((frozenset({400}), "invalid_request"))
    elif kind == "unknown":
        req.target = draw(st.sampled_from([b"/v1/node-runs/secret", b"/v1/runs/r1/node-runs", b"/v1/runs/"]))
        req.hard.append((frozenset({404}), "not_found"))
    elif kind == "bad_target":
        req.target, why = draw(st.sampled_from(BAD_TARGETS))
        req.notes.append(f"target: {why}")
        # A target that breaks the request line (space, CR) may surface as a parser error instead.
        req.hard.append((frozenset({400}), "invalid_request"))
    req.body = body

    framings = ["length", "chunked"] if body else ["none", "length", "chunked"]
    framing = draw(st.sampled_from(framings if clean else framings + ["bad", "big_trailer"]))
    any_code = (frozenset(range(400, 500)) | {501}, None)
    framing_lines: list[bytes] = []
    if framing == "bad":
        carried = body or b"hello"
        lines, req.wire_body, why, maybe = draw(bad_framing(carried))
        req.notes.append(f"framing: {why}")
        req.body = carried
        if req.method == b"GET" and not req.hard:
            req.hard.append((frozenset({400}), "invalid_request"))  # whatever the framing: a GET with a body
        if maybe:
            req.soft.append(any_code)
        else:
            req.framing_error = why not in KNOWN_BOUNDARY
            req.hard.append(any_code)
        framing_lines = lines
    elif framing == "big_trailer":
        framing_lines, req.wire_body, why = draw(oversized_trailers(body))
        req.notes.append(f"trailers: {why}")
        # Whatever else the request does wrong, the gateway may find that first; then the connection closes.
        req.hard.append((frozenset({431}), "request_header_fields_too_large"))
        req.framing_error = True
    elif framing == "length":
        lines, req.wire_body, notes = draw(valid_length(body))
        framing_lines = lines
        req.notes += notes
    elif framing == "chunked":
        lines, req.wire_body, notes, req.trailer_names = draw(valid_chunked(body))
        framing_lines = lines
        req.notes += notes
        if b"content-length" in req.trailer_names:
            req.soft.append(any_code)  # a framing field in the trailers: ignoring or refusing it are both sane
        if "TE with trailing tab" in notes:
            req.soft.append(any_code)  # valid OWS (RFC 9110 5.6.3), but llhttp refuses it: safe, if strict
        if req.method == b"GET" and not body:
            # An empty chunked body is no body, but refusing a GET that declares chunked framing is sane too.
            req.soft.append((frozenset({400}), "invalid_request"))
    elif req.method == b"POST":
        framing_lines = [b"Content-Length: 0"]

    for spoof in draw(st.lists(st.sampled_from(SPOOFS), max_size=2, unique=True)):
        headers.append(spoof + b": " + SPOOF)
    if draw(st.booleans()):
        headers.append(b"X_Custom_Name: underscore")
    if not clean and draw(st.integers(0, 9)) == 0:
        line, why, maybe = draw(st.sampled_from(BAD_HEADERS))
        headers.append(line)
        req.notes.append(f"header: {why}")
        if maybe:
            req.soft.append(any_code)
        else:
            req.framing_error = True
            req.hard.append(any_code)
    if not req.hard:
        req.want_status = draw(st.sampled_from([200, 200, 201, 404, 409]))
        headers.append(b"X-Want-Status: %d" % req.want_status)
    if token is not None:
        if draw(st.integers(0, 7)) == 0:
            if kind not in ("unknown", "bad_target"):
                req.hard.append((frozenset({401}), "unauthorized"))
        else:
            headers.append(b"Authorization: Bearer " + token.encode())
    # Other headers in any order; the framing lines as one block, their order being part of the case.
    draw(st.randoms()).shuffle(headers)
    at = draw(st.integers(0, len(headers)))
    headers[at:at] = framing_lines
    return req


# --------------------------------------------------------------------------- the property


@dataclass
class Edge:
    lt: LoopThread
    upstream: StrictUpstream
    url: str
    subject: bytes
    issuer: bytes | None


async def _exchange(edge: Edge, reqs: list[Req]) -> tuple[list[Response], bool]:
    """Writes the pipeline at once, reads answers until the gateway closes or each request got one."""
    conn = await RawConnection.open(edge.url)
    responses: list[Response] = []
    try:
        await conn.send(b"".join(r.wire(i == len(reqs) - 1) for i, r in enumerate(reqs)))
        while len(responses) < len(reqs):
            resp = await conn.response(method=reqs[len(responses)].method.decode("latin-1"), timeout=3)
            if resp is None:
                break
            responses.append(resp)
            if resp.closes:
                break
        closed = await conn.closed_by_peer(3)
    finally:
        await conn.close()
    await asyncio.sleep(0.005)  # the coordinator parses whatever followed the last request
    return responses, closed


def _refusal_text(refusals: list[tuple[frozenset[int], str | None]]) -> str:
    return ", ".join(("4xx" if len(s) > 3 else "/".join(map(str, sorted(s)))) + (f" {c}" if c else "")
                     for s, c in refusals) or "-"


def _describe(reqs: list[Req], responses: list[Response]) -> str:
    out = ["requests:"]
    for r in reqs:
        out.append(f"  {r.rid} must refuse: {_refusal_text(r.hard)}; may refuse: {_refusal_text(r.soft)}; "
                   f"{r.notes}\n    {r.wire(False)!r}")
    out.append("responses:")
    out += [f"  {resp.describe()}" for resp in responses]
    return "\n".join(out)


def check_pipeline(edge: Edge, reqs: list[Req]) -> None:
    before, violations_before = len(edge.upstream.requests), len(edge.upstream.violations)
    responses, closed = edge.lt.run(_exchange(edge, reqs))
    story = _describe(reqs, responses)
    leftovers = edge.upstream.leftovers()
    edge.lt.run(edge.upstream.drop_dirty())  # a failed example must not leak into the next one
    assert closed, f"the gateway kept the connection open after the last answer\n{story}"
    assert edge.upstream.violations[violations_before:] == [], story
    assert leftovers == [], story
    received = edge.upstream.requests[before:]

    forwarded: list[tuple[Req, Response]] = []
    for k, resp in enumerate(responses):
        req = reqs[k]
        seq = resp.header(SEQ_HEADER)
        where = f"answer {k} ({req.rid}, {req.notes})\n{story}"
        if seq is not None:
            assert not req.hard, f"accepted a request the contract refuses: {where}"
            assert resp.request_id == req.rid, f"answer of another request (smuggled?): {where}"
            assert resp.status == req.want_status, where
            forwarded.append((req, resp))
            continue
        error = resp.envelope()
        assert error is not None, f"a gateway answer that is not an ErrorEnvelope with its request id: {where}"
        assert req.refusals, f"refused a request the contract accepts: {where}"
        assert any(resp.status in statuses and code in (None, error["code"]) for statuses, code in req.refusals), \
            f"unexpected refusal {resp.status} {error['code']}: {where}"
        if req.framing_error:
            assert resp.closes, f"a parser refusal must close the connection: {where}"
    assert len(responses) == len(reqs) or (responses and responses[-1].closes), \
        f"the gateway closed without answering request {len(responses)}\n{story}"

    assert len(received) == len(forwarded), \
        f"the coordinator parsed {len(received)} requests for {len(forwarded)} accepted ones: " \
        f"{[(r.method, r.target, r.body[:80]) for r in received]}\n{story}"
    for rec, (req, resp) in zip(received, forwarded):
        where = f"{req.rid} ({req.notes})\n{story}"
        assert rec.seq == int(resp.header(SEQ_HEADER) or 0), where
        assert rec.one("X-Request-ID") == req.rid.encode(), where
        assert (rec.method, rec.target) == (req.method, req.target), where
        assert rec.body == req.body, where
        assert rec.all("Transfer-Encoding") == [], where
        length = rec.one("Content-Length")
        if req.body or req.method == b"POST":
            assert length == b"%d" % len(req.body), where
        else:
            assert length is None, f"GET without body sent with Content-Length: {where}"
        if req.content_encoding is not None:
            assert rec.all("Content-Encoding") == [req.content_encoding], where
        names = rec.folded_names()
        assert all(SPOOF not in value for _, value in rec.headers), f"client identity header forwarded: {where}"
        assert names.count(b"x-auth-subject") == 1 and rec.one("X-Auth-Subject") == edge.subject, where
        if edge.issuer is not None:
            assert names.count(b"x-auth-issuer") == 1 and rec.one("X-Auth-Issuer") == edge.issuer, where
        if b"x-trailer-probe" in req.trailer_names:  # (a spoofed X-Auth-Subject trailer: the SPOOF check above)
            assert b"x-trailer-probe" not in names, f"trailer forwarded as a header: {where}"


def _start(upstream: StrictUpstream, auth: dict[str, Any]) -> Any:
    async def start() -> tuple[Any, str]:
        url = await upstream.start()
        return await start_gateway(gateway_config(url, auth=auth, upstream={"retries": {"attempts": 1}},
                                                  logging={"access_log": False}))
    return start()


@pytest.fixture(scope="module")
def open_edge() -> Iterator[Edge]:
    with LoopThread() as lt:
        upstream = StrictUpstream()
        server, url = lt.run(_start(upstream, {"mode": "disabled", "dev_subject": "edge-dev"}))
        try:
            yield Edge(lt, upstream, url, b"edge-dev", None)
        finally:
            lt.run(server.cleanup())
            lt.run(upstream.close())


@pytest.fixture(scope="module")
def authed_edge(idp: ThreadIdp) -> Iterator[tuple[Edge, str]]:
    with LoopThread() as lt:
        upstream = StrictUpstream()
        try:
            token = lt.run(idp.token({"sub": "alice", "aud": AUD}, 900))
            auth = {"mode": "required", "issuers": [{"issuer": idp.issuer, "audiences": [AUD]}]}
            server, url = lt.run(_start(upstream, auth))
            try:
                yield Edge(lt, upstream, url, b"alice", idp.issuer.encode()), token
            finally:
                lt.run(server.cleanup())
        finally:
            lt.run(upstream.close())


@settings(max_examples=250, **SETTINGS)
@given(data=st.data())
def test_coordinator_receives_exactly_the_accepted_requests(open_edge: Edge, data: st.DataObject) -> None:
    reqs = data.draw(st.lists(requests(token=None), min_size=1, max_size=4), label="pipeline")
    check_pipeline(open_edge, reqs)


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_with_auth_required_the_coordinator_sees_only_verified_identity(authed_edge: tuple[Edge, str],
                                                                        data: st.DataObject) -> None:
    edge, token = authed_edge
    reqs = data.draw(st.lists(requests(token=token), min_size=1, max_size=3), label="pipeline")
    check_pipeline(edge, reqs)


def _well_framed(req: Req) -> bool:
    return not req.refusals and not req.framing_error


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_a_pipeline_deeper_than_the_queue_is_answered_whole_and_in_order(open_edge: Edge,
                                                                        data: st.DataObject) -> None:
    """More requests in one write than the listener queues (MAX_PIPELINED): it reads the rest as the
    queue empties, so every request is answered, in order, and forwarded exactly once."""
    reqs = data.draw(st.lists(requests(token=None, clean=True).filter(_well_framed), min_size=MAX_PIPELINED + 1,
                              max_size=MAX_PIPELINED + 16), label="pipeline")
    before = len(open_edge.upstream.requests)
    check_pipeline(open_edge, reqs)
    assert len(open_edge.upstream.requests) - before == len(reqs)
