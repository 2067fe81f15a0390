"""The framing property for generated coordinator answers: the client always gets one well-framed answer
that the gateway framed (issue 15).

Hypothesis writes coordinator answers by hand: interim 1xx answers, a status (valid, odd and out of
range, 101 included), a reason phrase with control bytes, header lines (hop-by-hop ones, and oversized
ones past `upstream.max_response_header_bytes`), a framing (Content-Length, chunked with trailers, a
body delimited by the close over HTTP/1.0 or 1.1, Transfer-Encoding: gzip), written in one to three
pieces by a raw asyncio server on 127.0.0.1. A strict h11 client reads what the gateway answers and the
test asserts: exactly one final answer, framed so h11 accepts it and ends it cleanly; the
coordinator's status and body when the answer was acceptable, else a 502 run_coordinator_bad_response
ErrorEnvelope; the gateway's own reason phrase and request id; no trailer, hop-by-hop line or interim
answer of the coordinator's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.runtime.server import start_gateway
from tests.support.gateway import gateway_config
from tests.support.loopthread import LoopThread

HEAD_LIMIT = 4096
SETTINGS = dict(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRAILER_MARK = b"from-a-trailer"
TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
VALUE = st.binary(max_size=40).map(lambda b: bytes(0x21 + c % 94 for c in b))  # visible ASCII


@dataclass
class Answer:
    interim: list[int]
    status: bytes
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    framing: str              # length, chunked, close10, close11, gzip
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    pieces: list[int]         # cut points of the wire bytes
    keep_open: bool
    notes: list[str] = field(default_factory=list)

    def wire(self) -> bytes:
        out = b"".join(b"HTTP/1.1 %d Interim\r\nX-Interim: 1\r\n\r\n" % code for code in self.interim)
        version = b"1.0" if self.framing == "close10" else b"1.1"
        lines = [b"HTTP/" + version + b" " + self.status + b" " + self.reason]
        lines += [name + b": " + value for name, value in self.headers]
        if self.framing == "length":
            lines.append(b"Content-Length: %d" % len(self.body))
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        elif self.framing == "gzip":
            lines.append(b"Transfer-Encoding: gzip")
        out += b"\r\n".join(lines) + b"\r\n\r\n"
        if self.framing == "chunked":
            if self.body:
                out += b"%x\r\n%s\r\n" % (len(self.body), self.body)
            out += b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in self.trailers) + b"\r\n"
        else:
            out += self.body
        return out

    @property
    def closes(self) -> bool:
        return self.framing in ("close10", "close11", "gzip") or not self.keep_open

    def head_size(self) -> int:
        return sum(len(n) + len(v) + 4 for n, v in self.headers) + len(self.reason) + 15 + 40 * len(self.interim)

    def refusal(self) -> set[str]:
        """The error codes of the 502 the gateway must answer instead of relaying; empty: it relays."""
        status = int(self.status)
        # 1xx, 204 and 304 answers have no body, so no coding to refuse.
        coded = self.framing == "gzip" and status >= 200 and status not in (204, 304)
        if not 100 <= status <= 599 or status == 101 or coded or self.head_size() > HEAD_LIMIT:
            return {"run_coordinator_bad_response"}
        if status < 200:
            # Only interim answers, then the close: no answer came (or, with a body after it, garbage).
            return {"run_coordinator_unavailable", "run_coordinator_bad_response"}
        return set()


HOP = [(b"Connection", b"X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"Upgrade", b"h2c"),
       (b"Proxy-Authenticate", b"Basic")]


@st.composite
def answers(draw: Any) -> Answer:
    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    status = draw(st.sampled_from([b"200", b"201", b"202", b"204", b"299", b"304", b"404", b"409", b"500", b"503",
                                   b"101", b"199", b"600", b"999"]))
    reason = draw(st.sampled_from([b"OK", b"", b"Totally Fine", b"O\x00K", b"Tab\there", b"Reason\x7f",
                                   b"Created Here", b"\x80\xff high"]))
    headers = [(b"X-" + draw(TOKEN).encode(), draw(VALUE)) for _ in range(draw(st.integers(0, 4)))]
    if draw(st.booleans()):
        headers += draw(st.lists(st.sampled_from(HOP), max_size=3, unique=True))
    if draw(st.integers(0, 5)) == 0:
        headers.append((b"X-Huge", b"h" * draw(st.sampled_from([HEAD_LIMIT + 1, 3 * HEAD_LIMIT, 70_000]))))
    if draw(st.integers(0, 7)) == 0:
        headers += [(b"X-Many", b"m")] * draw(st.sampled_from([HEAD_LIMIT // 4, HEAD_LIMIT]))
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close10", "close11", "gzip"]))
    no_body = int(status) in (204, 304) or int(status) < 200
    body = b"" if no_body else draw(st.binary(max_size=300))
    trailers = []
    if framing == "chunked":
        trailers = draw(st.lists(st.sampled_from([(b"Set-Cookie", b"t=" + TRAILER_MARK),
                                                  (b"WWW-Authenticate", b"Basic realm=" + TRAILER_MARK),
                                                  (b"X-Trailer-Probe", TRAILER_MARK)]), max_size=3, unique=True))
    # After a lone interim answer the coordinator closes: kept open, the gateway would wait for the
    # request timeout (covered by test_forwarding's slow-coordinator tests).
    answer = Answer(interim, status, reason, draw(st.permutations(headers)), framing, body, trailers, [],
                    int(status) >= 200 and draw(st.booleans()))
    size = len(answer.wire())
    answer.pieces = sorted(draw(st.lists(st.integers(1, max(1, size - 1)), max_size=2, unique=True)))
    return answer


class ScriptedCoordinator:
    """Answers each request with the current `answer`, then closes if the answer says so."""

    def __init__(self) -> None:
        self.answer: Answer | None = None
        self.server: asyncio.base_events.Server | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answer = self.answer
                assert answer is not None
                wire = answer.wire()
                cuts = [0, *answer.pieces, len(wire)]
                for start, end in zip(cuts, cuts[1:]):
                    writer.write(wire[start:end])
                    await writer.drain()
                    if end < len(wire):
                        await asyncio.sleep(0.002)  # the pieces arrive as separate reads
                if answer.closes:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._serving.discard(task)

    async def close(self) -> None:
        """Stops serving; ends the connections still open, so no task outlives the loop."""
        assert self.server is not None
        self.server.close()
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        await self.server.wait_closed()


@dataclass
class Edge:
    lt: LoopThread
    coordinator: ScriptedCoordinator
    host: str
    port: int


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    with LoopThread() as lt:
        coordinator = ScriptedCoordinator()
        url = lt.run(coordinator.start())
        cfg = gateway_config(url, upstream={"request_timeout_s": 3, "stream_idle_timeout_s": 3,
                                            "max_response_header_bytes": HEAD_LIMIT, "retries": {"attempts": 1}})
        runner, gateway_url = lt.run(start_gateway(cfg))
        host, port = gateway_url.removeprefix("http://").split(":")
        yield Edge(lt, coordinator, host, int(port))
        lt.run(runner.cleanup())
        lt.run(coordinator.close())


async def _exchange(edge: Edge, target: str) -> bytes:
    reader, writer = await asyncio.open_connection(edge.host, edge.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 8)
    finally:
        writer.close()


def parse(data: bytes, target: str) -> tuple[h11.Response, list[Any], bytes]:
    """The gateway's answer as a strict client reads it: one final response, ended cleanly."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target=target, headers=[("Host", "gw"), ("Connection", "close")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    events: list[Any] = []
    while True:
        event = client.next_event()
        assert event is not h11.NEED_DATA, f"the answer was cut short: {data[:500]!r}"
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            break
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    responses = [e for e in events if isinstance(e, (h11.Response, h11.InformationalResponse))]
    assert [type(r) for r in responses] == [h11.Response], f"not exactly one final answer: {responses}"
    assert isinstance(events[-1], h11.EndOfMessage), f"the body did not end cleanly: {events}"
    body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
    return responses[0], events, body


@settings(**SETTINGS)
@given(answer=answers(), events=st.booleans())
def test_every_coordinator_answer_reaches_the_client_well_framed_by_the_gateway(edge: Edge, answer: Answer,
                                                                               events: bool) -> None:
    edge.coordinator.answer = answer
    target = "/v1/runs/r1/events" if events else "/v1/runs/r1"
    data = edge.lt.run(_exchange(edge, target))
    story = f"coordinator sent {answer.wire()[:600]!r}\nclient got {data[:600]!r}"
    try:
        response, _, body = parse(data, target)
    except h11.RemoteProtocolError as exc:
        raise AssertionError(f"h11 refused the gateway's answer: {exc}\n{story}") from None
    headers = {}
    for name, value in response.headers:
        headers.setdefault(name.lower(), []).append(value)
    assert headers.get(b"x-request-id"), story
    expected_reason = HTTPStatus(response.status_code).phrase.encode() if response.status_code in \
        HTTPStatus._value2member_map_ else b"Unknown"
    assert response.reason == expected_reason, story
    codes = answer.refusal()
    if codes:
        assert response.status_code == 502, story
        error = json.loads(body)["error"]
        assert error["code"] in codes, story
        assert error["details"]["request_id"] == headers[b"x-request-id"][0].decode(), story
        return
    assert response.status_code == int(answer.status), story
    assert body == answer.body, story
    for name, values in headers.items():
        assert all(TRAILER_MARK not in v for v in values), f"a trailer became header {name!r}\n{story}"
    hop = [b"keep-alive", b"upgrade", b"proxy-authenticate", b"x-interim"]
    if (b"Connection", b"X-Hop") in answer.headers:
        hop.append(b"x-hop")  # named hop-by-hop by the coordinator's Connection line
    for name in hop:
        assert name not in headers, f"{name!r} crossed the hop\n{story}"
    assert headers.get(b"connection", [b"close"]) == [b"close"], story
