"""TLS contexts that follow their files: reloaded without a restart, the old one kept when a new pair is bad.

`CertificateFiles` holds the current context built from a set of files (util/certificates.py
loads and checks them) and rebuilds it when the files change: every `reload_interval_s` from its
own periodic sweep (edge/sweep.py: a pass that raises is logged, rate-limited, and the next one
runs), and whenever `check(force=True)` is called (SIGHUP). The coordinator pool reads `.context`
for each new connection.

`ServerTls` is the public listener's side. An asyncio server keeps the context it was created
with, so every context built here carries an SNI callback that moves each new handshake onto the
current one (`SSLObject.context = ...`: OpenSSL's SSL_set_SSL_CTX, which swaps the certificate
and key); connections already open keep theirs. Handshakes that fail never reach a protocol
(asyncio drops them silently), so the SSL objects the server makes count their own failures.

    files = CertificateFiles("listen", TlsFiles(cert, key, ca), build, reload_interval_s=10, on_reload=...)
    tls = ServerTls(files, on_failure=metrics.tls_handshake_failed)
    url = await listener.start(host, port, tls=tls)   # each accept: an edge/handshake.py TlsHandshake
    files.watch(loop)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from ..util.certificates import BuiltContext, CertificateProblem, Stamp, TlsFiles, files_stamp
from .sweep import DeadlineSweep

log = logging.getLogger("proxy.edge.tls")

FAILURE_LOG_INTERVAL_S = 10.0
# OpenSSL reason codes, mapped to the bounded `reason` label of arp_gateway_tls_handshake_failures_total.
HANDSHAKE_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "CERTIFICATE_VERIFY_FAILED": "bad_certificate",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "HTTP_REQUEST": "plain_http",
    "HTTPS_PROXY_REQUEST": "plain_http",
}
# `timeout` and `client_closed`: handshakes that never finished, cut at limits.header_timeout_s or
# left by the client (edge/handshake.py).
HANDSHAKE_FAILURE_REASONS = (*sorted(set(HANDSHAKE_REASONS.values())), "client_alert", "timeout", "client_closed",
                             "other")


def handshake_reason(exc: ssl.SSLError) -> str:
    code = exc.reason or ""
    if code in HANDSHAKE_REASONS:
        return HANDSHAKE_REASONS[code]
    if "ALERT" in code:
        return "client_alert"   # the client refused us (our certificate, the version, ...)
    return "other"


Builder = Callable[[TlsFiles], BuiltContext]
# result ("success" or "failure"), and the leaf's notAfter in service afterwards
ReloadCallback = Callable[[str, float | None], None]


def _check(files: CertificateFiles, _now: float) -> None:
    files.check()


class CertificateFiles:
    """The context of one set of files, rebuilt when they change; a bad new set keeps the old context."""

    def __init__(self, name: str, files: TlsFiles, build: Builder, *, reload_interval_s: float,
                 on_reload: ReloadCallback | None = None) -> None:
        self.name = name                   # "listen" or "upstream": the metrics label and log field
        self.files = files
        self._build = build
        self.on_reload = on_reload
        self._stamp: Stamp = files_stamp(files)
        built = build(files)               # at start-up a bad pair is fatal (the configuration said so already)
        self.context: ssl.SSLContext = built.context
        self.not_after = built.not_after
        self.reloads = 0
        self.failures = 0
        self._sweep = DeadlineSweep(f"tls_{name}", reload_interval_s, due=lambda _now: (self,),
                                    expire=_check)
        self.listeners: list[Callable[[ssl.SSLContext], object]] = []  # told of each new context

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep.start(loop)

    def stop(self) -> None:
        self._sweep.stop()

    def check(self, *, force: bool = False) -> bool:
        """Rebuilds the context if the files changed (or `force`); True when a new one is in service."""
        stamp = files_stamp(self.files)
        if stamp == self._stamp and not force:
            return False
        # Remembered even when the new files are bad: one error per change, not one per interval;
        # the next change (the pair completed, or fixed) is tried again.
        self._stamp = stamp
        try:
            built = self._build(self.files)
        except CertificateProblem as exc:
            self.failures += 1
            log.error("new TLS certificate refused; the old one stays in service", extra={
                "event": "tls_reload_failed", "tls": self.name, "key": exc.key, "reason": exc.reason})
            if self.on_reload is not None:
                self.on_reload("failure", self.not_after)
            return False
        self.context, self.not_after = built.context, built.not_after
        self.reloads += 1
        for tell in self.listeners:
            tell(built.context)
        log.info("TLS certificate reloaded", extra={
            "event": "tls_reloaded", "tls": self.name, "not_after": self.not_after})
        if self.on_reload is not None:
            self.on_reload("success", self.not_after)
        return True


class ServerTls:
    """The public listener's TLS: the context the server starts with, new handshakes moved to the
    current one, and failed handshakes counted and logged (rate-limited)."""

    def __init__(self, files: CertificateFiles, *, on_failure: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self.on_failure = on_failure
        self._clock = clock
        self._last_logged = -FAILURE_LOG_INTERVAL_S
        self._unlogged = 0
        self.failures: dict[str, int] = {}
        self.object_class = self._counting_class()
        self.context = self._prepare(files.context)
        files.listeners.append(self._prepare)

    def _prepare(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.sni_callback = self._pick
        context.sslobject_class = self.object_class
        return context

    def _pick(self, ssl_object: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.files.context
        if context is not current:
            ssl_object.context = current

    def _counting_class(self) -> type[ssl.SSLObject]:
        failed = self.failed

        class CountedSSLObject(ssl.SSLObject):
            def do_handshake(self) -> None:
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise
                except ssl.SSLError as exc:
                    try:
                        failed(exc)
                    except Exception:  # counting must never turn a refused handshake into a crash
                        log.exception("counting a failed TLS handshake failed", extra={"event": "tls_count_failed"})
                    raise

        return CountedSSLObject

    def failed(self, exc: ssl.SSLError) -> None:
        self._count(handshake_reason(exc), exc.reason or type(exc).__name__)

    def abandoned(self, reason: str) -> None:
        """A handshake that never finished: `timeout` or `client_closed`."""
        self._count(reason, reason)

    def _count(self, reason: str, detail: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if self.on_failure is not None:
            self.on_failure(reason)
        now = self._clock()
        if now - self._last_logged < FAILURE_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        self._last_logged = now
        log.warning("TLS handshake failed", extra={
            "event": "tls_handshake_failed", "reason": reason, "detail": detail,
            "suppressed": self._unlogged})
        self._unlogged = 0
