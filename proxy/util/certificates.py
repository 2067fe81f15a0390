"""Certificate material read from files: a pair (and a CA bundle) loaded, checked and turned into an
`ssl.SSLContext`, the identity of the files on disk, and what a client certificate says.

One loader for every TLS context the gateway makes (the public listener, the coordinator pool, the
coordinator probe) and for the start-up check of the configuration, so a pair that would fail a
reload fails start-up the same way, naming the key.

    built = build_context(TlsFiles(cert_file=..., key_file=..., ca_file=...), server=True, min_version="1.2")
    built.context, built.not_after          # an SSLContext, and the leaf certificate's expiry (epoch s)
    stamp = files_stamp(files)              # changes when any file is replaced (rename, symlink swap, rewrite)
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

ALPN = ("http/1.1",)
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertificateProblem(Exception):
    """A pair or bundle that cannot be used; `key` names the file at fault ("cert_file", "key_file",
    "ca_file"), the message says why in an operator's words, never the file's content."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files of one TLS context; any may be None (a client context may have only a CA)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None

    def paths(self) -> tuple[tuple[str, str], ...]:
        return tuple((key, path) for key, path in (("cert_file", self.cert_file), ("key_file", self.key_file),
                                                   ("ca_file", self.ca_file)) if path)


@dataclass(frozen=True, slots=True)
class BuiltContext:
    context: ssl.SSLContext
    not_after: float | None      # the leaf certificate's notAfter (epoch seconds); None without a certificate


Stamp = tuple[tuple[int, int, int, int] | None, ...]


def files_stamp(files: TlsFiles) -> Stamp:
    """Device, inode, mtime and size of each file, its symlinks followed: a Kubernetes Secret volume
    swaps its `..data` symlink to a new directory, so the path stays and what it resolves to changes."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for _, path in files.paths():
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateProblem(key, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _certificates(key: str, path: str) -> list[x509.Certificate]:
    data = _read(key, path)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise CertificateProblem(key, f"{path} holds no PEM certificate")
    return found


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
    return str(reason)


def build_context(files: TlsFiles, *, server: bool, min_version: str = "1.2",
                  client_auth: str = "none", session_tickets: int = 2,
                  now: Callable[[], float] = time.time) -> BuiltContext:
    """Loads and checks `files` into a new context: the certificate parses and has not expired, the
    key parses and matches it, the CA bundle parses. Raises CertificateProblem naming the file.
    A server context sends `session_tickets` TLS 1.3 tickets after each full handshake."""
    not_after = None
    if files.cert_file:
        leaf = _certificates("cert_file", files.cert_file)[0]
        not_after = leaf.not_valid_after_utc.timestamp()
        if not_after <= now():
            raise CertificateProblem("cert_file", f"{files.cert_file} expired at "
                                                  f"{leaf.not_valid_after_utc.isoformat()}")
    if bool(files.cert_file) != bool(files.key_file):
        raise CertificateProblem("key_file" if files.cert_file else "cert_file",
                                 "cert_file and key_file are set together")
    if files.ca_file:
        _certificates("ca_file", files.ca_file)
    if server:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    elif files.ca_file:
        # A private CA replaces the system trust store: the coordinator is trusted only through it.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = MIN_VERSIONS[min_version]
    context.set_alpn_protocols(list(ALPN))
    if files.cert_file and files.key_file:
        _read("key_file", files.key_file)  # a missing or unreadable key is named as such, not as a mismatch
        try:
            context.load_cert_chain(files.cert_file, files.key_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = "does not match the certificate" if "MISMATCH" in _ssl_reason(exc) else \
                f"cannot be loaded ({_ssl_reason(exc)})"
            raise CertificateProblem("key_file", f"{files.key_file} {why}") from None
    if files.ca_file:
        try:
            context.load_verify_locations(cafile=files.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateProblem("ca_file", f"{files.ca_file} cannot be loaded ({_ssl_reason(exc)})") from None
    if server:
        context.num_tickets = session_tickets
        context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                               "required": ssl.CERT_REQUIRED}[client_auth]
    return BuiltContext(context, not_after)


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client certificate of one connection, read once when its handshake completes."""

    thumbprint: str              # RFC 8705 x5t#S256: base64url (unpadded) SHA-256 of the DER certificate
    subject: str                 # RFC 4514
    uris: tuple[str, ...]        # subjectAltName URIs (SPIFFE IDs)


def thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """The verified client certificate on a connection, or None when it sent none."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
    except ValueError:
        return PeerCertificate(thumbprint(der), "", ())
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))  # type: ignore[attr-defined]
    except (x509.ExtensionNotFound, ValueError):
        uris = ()
    return PeerCertificate(thumbprint(der), subject, uris)
