"""Header hygiene between client, gateway and coordinator.

What crosses this hop and what does not: hop-by-hop headers (RFC 9110 7.6.1, and any
named on a Connection line) never do; neither does any client header that could be read
as an identity header, compared after folding `_` to `-` and case as CGI/WSGI stacks do.
The filtered blocks are cached by their exact bytes: a keep-alive client, and a
coordinator, repeat the same headers message after message.

X-Forwarded-For/-Proto/-Host are the gateway's own unless the peer is one of
`listen.trusted_proxies` (an ingress that terminated TLS and named the client): only
then are they believed, and the client address is the rightmost X-Forwarded-For hop
that is not itself a trusted proxy.

    client = ClientHeaders(strip_prefix="X-Auth-", strip_names=("X-Auth-Email",))
    block = client.block(request)                 # ready header lines for the coordinator
    lines, dated = ResponseHeaders().block(raw)   # the coordinator's lines for the client
    trusted = TrustedProxies(("10.0.0.0/8",))
    address = trusted.client(request) if trusted.trusts(request.conn.peer) else request.conn.peer
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from ..edge.request import Request
from ..util.boundedcache import BoundedCache

# RFC 9110 section 7.6.1 plus the legacy names proxies still meet in the wild.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Set by the gateway itself, never copied from the client. Forwarded (RFC 7239) and X-Real-IP name a
# client address too: the gateway vouches for X-Forwarded-For alone, so a client cannot plant one there.
_REPLACED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                       b"forwarded", b"x-real-ip", b"x-request-id", b"expect", b"authorization",
                       b"content-length"})
# X-Request-ID is the gateway's, and this hop frames the body itself.
_REFRAMED = HOP_BY_HOP | {b"x-request-id", b"content-length"}
CLIENT_HEADER_CACHE = 1024
RESPONSE_HEADER_CACHE = 256
TRUST_CACHE = 4096
# X-Forwarded-For hops looked at, from the right: a chain of trusted-looking hops cannot make
# the gateway parse a whole 64 KiB head of addresses.
MAX_FORWARDED_HOPS = 16
_FORWARDED_HOST = re.compile(rb"[A-Za-z0-9.\-_~%:\[\]]{1,255}")
_PROTOS = {b"http": b"http", b"https": b"https"}


class TrustedProxies:
    """The peers whose X-Forwarded-* the gateway believes (`listen.trusted_proxies`)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n) for n in networks)
        # A verdict per address: a connection's peer repeats request after request.
        self._verdicts: BoundedCache[str, bool] = BoundedCache(TRUST_CACHE)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is None:
            verdict = self._check(address)
            self._verdicts.put(address, verdict)
        return verdict

    def _check(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(ip in network for network in self._networks)

    def client(self, request: Request) -> str:
        """The client behind a trusted peer: walking X-Forwarded-For from the right, the first hop
        that is not a trusted proxy. A hop that is not an address ends the walk at the last proxy
        that named one, so a forged or garbled entry can never become the client address."""
        client = request.conn.peer
        chain = [value for name, value in request.headers if fold(name) == b"x-forwarded-for"]
        if not chain:
            return client
        hops = b",".join(chain).split(b",")
        for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
            try:
                address = str(ipaddress.ip_address(hop.strip().decode("latin-1")))
            except ValueError:
                break
            client = address
            if not self.trusts(address):
                break
        return client


def fold(name: bytes) -> bytes:
    """A header name as CGI/WSGI stacks read it: `X_Auth_Subject` and `x-auth-subject` are one name."""
    return name.lower().replace(b"_", b"-")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any `Connection` line (RFC 9110 7.6.1: they are hop-by-hop too)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(fold(t.strip()) for t in value.split(b","))
    return frozenset(named)


def end_to_end(raw: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The coordinator's headers minus `drop` and any named on its Connection lines."""
    named = connection_tokens(raw) if any(n.lower() == b"connection" for n, _ in raw) else frozenset()
    return [(name, value) for name, value in raw if (low := name.lower()) not in drop and low not in named]


def response_header_block(raw: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> tuple[bytes, bool]:
    """The coordinator's header lines as this hop relays them, and whether the coordinator sent a Date."""
    kept = end_to_end(raw, drop)
    return b"".join(b"%s: %s\r\n" % pair for pair in kept), any(name.lower() == b"date" for name, _ in raw)


class ClientHeaders:
    """The client's headers as the coordinator gets them, plus X-Forwarded-*."""

    def __init__(self, *, strip_prefix: str = "", strip_names: Iterable[str] = (),
                 trusted: TrustedProxies | None = None) -> None:
        self._trusted = trusted if trusted else None
        self._strip_prefix = fold(strip_prefix.encode()) or None
        self._drop = HOP_BY_HOP | _REPLACED | {fold(n.encode()) for n in strip_names}
        self._blocks: BoundedCache[tuple[tuple[tuple[bytes, bytes], ...], str, bytes | None], bytes] = \
            BoundedCache(CLIENT_HEADER_CACHE)
        self._find = self._blocks.getter(touch=False)

    def block(self, request: Request) -> bytes:
        """Cached by the exact header bytes and the peer. The key holds no token: the listener
        keeps Authorization out of `request.headers`."""
        key = (tuple(request.headers), request.conn.peer, request.host)
        block = self._find(key)
        if block is None:
            block = self._filter(request)
            self._blocks.put(key, block)
        return block

    def _filter(self, request: Request) -> bytes:
        raw = request.headers
        drop = self._drop | connection_tokens(raw)
        prefix = self._strip_prefix
        trusted = self._trusted is not None and self._trusted.trusts(request.conn.peer)
        prior: list[bytes] = []
        proto = b"http"
        host = request.host
        parts: list[bytes] = []
        for name, value in raw:
            low = fold(name)
            if low in drop or (prefix is not None and low.startswith(prefix)):
                if trusted:  # an untrusted peer's X-Forwarded-* is replaced, never extended
                    if low == b"x-forwarded-for":
                        prior.append(value)
                    elif low == b"x-forwarded-proto":
                        proto = _PROTOS.get(value.rpartition(b",")[2].strip().lower(), proto)
                    elif low == b"x-forwarded-host":
                        given = value.rpartition(b",")[2].strip()
                        if _FORWARDED_HOST.fullmatch(given):
                            host = given
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += (b"X-Forwarded-For: ", b", ".join([*prior, request.conn.peer.encode()]),
                  b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
        if host is not None:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        return b"".join(parts)


class ResponseHeaders:
    """The coordinator's header lines for the client, framed by this hop."""

    def __init__(self) -> None:
        self._blocks: BoundedCache[tuple[tuple[bytes, bytes], ...], tuple[bytes, bool]] = \
            BoundedCache(RESPONSE_HEADER_CACHE)
        self._find = self._blocks.getter(touch=False)

    def block(self, raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
        """Cached by the exact header bytes: a coordinator repeats its headers answer after answer,
        only its Date moving once a second."""
        key = tuple(raw)
        block = self._find(key)
        if block is None:
            block = response_header_block(raw, _REFRAMED)
            self._blocks.put(key, block)
        return block
