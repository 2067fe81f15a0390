"""A raw-socket HTTP/1.1 client for edge tests: writes exactly the bytes given, reads answers strictly.

HTTP client libraries normalise what they send (and refuse to send malformed
framing), so edge tests write request bytes by hand. Answers are read with a
small strict reader: a malformed answer from the gateway fails the test here
instead of being papered over.

    conn = await RawConnection.open(url)
    await conn.send(b"GET /v1/runs/r1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    resp = await conn.response()          # None: the gateway closed without answering
    assert await conn.closed_by_peer()
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3}) ([^\r\n]*)")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")


class MalformedResponse(AssertionError):
    pass


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    interim: list[Response] = field(default_factory=list)  # 1xx answers that came before this one

    def header(self, name: str) -> str | None:
        values = self.headers_all(name)
        if len(values) > 1:
            raise MalformedResponse(f"{name} appears {len(values)} times: {values}")
        return values[0] if values else None

    def headers_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for n, v in self.headers if n.lower() == low]

    @property
    def request_id(self) -> str | None:
        return self.header("X-Request-ID")

    @property
    def closes(self) -> bool:
        tokens = {t.strip().lower() for v in self.headers_all("Connection") for t in v.split(",")}
        if self.version == "1.0":
            return "keep-alive" not in tokens
        return "close" in tokens

    def json(self) -> Any:
        return json.loads(self.body)

    def envelope(self) -> dict[str, Any] | None:
        """The ARP ErrorEnvelope's `error` object when this is one (with a matching request id), else None."""
        if not (self.header("Content-Type") or "").startswith("application/json"):
            return None
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("code"), str) \
                or not isinstance(error.get("message"), str):
            return None
        details = error.get("details")
        if not isinstance(details, dict) or details.get("request_id") != self.request_id or not self.request_id:
            return None
        return error

    def describe(self) -> str:
        return f"{self.status} {self.headers} {self.body[:300]!r}"


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET",
                        timeout: float = 5.0) -> Response | None:
    """One answer, with any 1xx answers before it in `interim`. None when the peer closed first."""
    interim: list[Response] = []
    async with asyncio.timeout(timeout):
        while True:
            resp = await _read_one(reader, method)
            if resp is None:
                if interim:
                    raise MalformedResponse(f"connection closed after interim answers {interim}")
                return None
            if 100 <= resp.status < 200:
                interim.append(resp)
                continue
            resp.interim = interim
            return resp


async def _read_one(reader: asyncio.StreamReader, method: str) -> Response | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise MalformedResponse(f"connection closed inside a response head: {exc.partial[:300]!r}") from None
        return None
    except ConnectionResetError:
        return None
    status_line, *lines = head[:-4].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise MalformedResponse(f"bad status line {status_line!r}")
    headers = []
    for line in lines:
        h = _HEADER_LINE.fullmatch(line)
        if h is None:
            raise MalformedResponse(f"bad header line {line!r}")
        headers.append((h.group(1).decode(), h.group(2).decode("latin-1")))
    resp = Response(int(match.group(2)), match.group(3).decode("latin-1"), f"1.{match.group(1).decode()}", headers)
    if resp.status < 200 or resp.status in (204, 304) or method == "HEAD":
        return resp
    te = resp.headers_all("Transfer-Encoding")
    if te:
        if [t.strip().lower() for t in ",".join(te).split(",")] != ["chunked"]:
            raise MalformedResponse(f"unexpected Transfer-Encoding {te}")
        resp.body = await _dechunk(reader)
    elif (length := resp.header("Content-Length")) is not None:
        if not length.isdigit():
            raise MalformedResponse(f"bad Content-Length {length!r}")
        resp.body = await reader.readexactly(int(length))
    else:
        resp.body = await reader.read()
    return resp


async def _dechunk(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readuntil(b"\r\n"))[:-2]
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise MalformedResponse("chunk data not followed by CRLF")


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, url: str, *, limit: int = 4 * 1024 * 1024) -> RawConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port, limit=limit), 5)
        return cls(reader, writer, parts.netloc)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, method: str = "GET", timeout: float = 5.0) -> Response | None:
        return await read_response(self.reader, method=method, timeout=timeout)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the gateway closes the connection (EOF or reset) within `timeout`, sending nothing more."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        if data:
            raise MalformedResponse(f"unexpected bytes instead of a close: {data[:300]!r}")
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def request(method: str, target: str | bytes, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
            *, host: str = "gateway.test", version: str = "1.1", length: bool = True) -> bytes:
    """Request bytes with a Host and (for a body, unless length=False) a Content-Length."""
    if isinstance(target, str):
        target = target.encode()
    lines = [method.encode() + b" " + target + b" HTTP/" + version.encode()]
    names = {n.lower() for n, _ in headers or []}
    if "host" not in names:
        lines.append(b"Host: " + host.encode())
    lines += [n.encode("latin-1") + b": " + v.encode("latin-1") for n, v in headers or []]
    if body and length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes, sizes: list[int] | None = None, *, ext: bytes = b"",
            trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
    """`body` as chunked framing (one chunk unless `sizes` given), with an extension on every size line."""
    out = bytearray()
    pos = 0
    for size in sizes or ([len(body)] if body else []):
        piece = body[pos:pos + size]
        pos += len(piece)
        if piece:
            out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
    if pos < len(body):
        out += b"%x%s\r\n%s\r\n" % (len(body) - pos, ext, body[pos:])
    out += b"0" + ext + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    return bytes(out)


def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush()
