"""A secret held in a file that may change under a running gateway (a mounted Kubernetes Secret).

The kubelet rotates a mounted Secret by writing a new directory and swapping a symlink, so the path
stays and what it resolves to changes; an operator may also rewrite the file in place. `value()`
re-stats the path each time the secret is about to be sent and re-reads it when the file's identity
(device, inode, mtime, size) differs from the one last read. It is meant for calls that are rare
next to client requests (an STS request, a connection to a store), never for each request.

A file that becomes unreadable or empty after start keeps the last good secret in use and logs a
warning at most once per WARN_EVERY_S; no log line ever holds the secret, only its key and path.

    secret = SecretFile("/var/run/secrets/sts/client-secret", "auth.exchange.client_secret_file", clock)
    form["client_secret"] = secret.value()
"""

from __future__ import annotations

import logging
import os

from .clock import Clock, SystemClock

log = logging.getLogger("proxy.util.secretfile")

WARN_EVERY_S = 60.0


class SecretFileError(Exception):
    """The file cannot give a secret; `reason` names why, never the content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_secret(path: str) -> str:
    """The file's content without its final line break (`echo secret > file` and editors add one)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or type(exc).__name__}") \
            from None
    content = content.rstrip("\r\n")
    if not content:
        raise SecretFileError(f"{path} is empty")
    return content


class SecretFile:
    def __init__(self, path: str, key: str, clock: Clock | None = None, *, initial: str | None = None) -> None:
        """`key` is the configuration key that named the file, for log lines; `initial` is the value
        read when the configuration was loaded, used until a read succeeds."""
        self.path = path
        self._key = key
        self._clock = clock or SystemClock()
        self._value = initial
        self._stamp: tuple[int, int, int, int] | None = None
        self._warned_at: float | None = None

    def value(self) -> str:
        """The current secret; raises SecretFileError only when no read has ever succeeded."""
        try:
            st = os.stat(self.path)  # follows the symlink, so a swapped target is a new inode
        except OSError as exc:
            return self._keep(f"cannot read {self.path}: {exc.strerror or type(exc).__name__}")
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and self._value is not None:
            return self._value
        try:
            content = read_secret(self.path)
        except SecretFileError as exc:
            return self._keep(exc.reason)
        changed = self._stamp is not None and content != self._value
        self._stamp, self._value = stamp, content
        if changed:
            log.info("secret file changed; using its new content",
                     extra={"event": "secret_file_reloaded", "key": self._key, "path": self.path})
        return content

    def _keep(self, reason: str) -> str:
        if self._value is None:
            raise SecretFileError(reason)
        now = self._clock.monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("secret file unusable; keeping the last good secret",
                        extra={"event": "secret_file_unreadable", "key": self._key, "reason": reason})
        return self._value
