"""Whole lines onto a stream that several writers share (the process's stdout).

The access log and the audit trail (with `audit.sink: stdout`) both write JSON lines to stdout.
Each stream has one `LineOut` (`shared(stream)`), through which every writer goes: lines are
batched and written together (at most every FLUSH_INTERVAL_S, or at once when FLUSH_LINES pile
up), since a write and flush per line would cost more than the rest of the request; and a
writer that must know whether its lines got out (the audit trail) writes its batch with `write`,
after what is already batched and in the same write, so no line is ever cut by another's.

    out = shared(sys.stdout)
    out.add(line)                 # batched; a failed write loses the lines, never fails the caller
    out.write(lines)              # now, with what is batched; raises OSError/ValueError on failure
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TextIO

log = logging.getLogger("proxy.observability.lines")

FLUSH_INTERVAL_S = 0.2
FLUSH_LINES = 256
ERROR_LOG_INTERVAL_S = 10.0


class LineOut:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._pending: list[str] = []
        self._handle: asyncio.TimerHandle | None = None
        self._last_error: float | None = None

    def add(self, line: str) -> None:
        """One line without its newline, written with the next batch."""
        self._pending.append(line)
        if len(self._pending) >= FLUSH_LINES:
            self.flush()
        elif self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)

    def _take(self) -> str:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._pending:
            return ""
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        return text

    def write(self, lines: str) -> None:
        """`lines` (each ending in a newline) now, after the batched ones, in one write and flush."""
        text = self._take() + lines
        self._out.write(text)
        self._out.flush()

    def flush(self) -> None:
        text = self._take()
        if not text:
            return
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stdout must never fail a request; the lines are lost
        except Exception:
            # Anything else is a bug in the stream, not in the request that happened to fill the
            # batch: it must neither fail that request nor stop later flushes. Said once per interval.
            now = time.monotonic()
            if self._last_error is None or now - self._last_error >= ERROR_LOG_INTERVAL_S:
                self._last_error = now
                log.exception("log write failed; %d lines lost", text.count("\n"))


_shared: weakref.WeakKeyDictionary[TextIO, LineOut] = weakref.WeakKeyDictionary()


def shared(out: TextIO) -> LineOut:
    """The one LineOut of `out`: every writer of a stream batches through the same object."""
    lines = _shared.get(out)
    if lines is None:
        lines = _shared[out] = LineOut(out)
    return lines
