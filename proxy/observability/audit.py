"""The audit trail: one JSON line per decision on a run route, written off the request path.

`record` never blocks and never raises: it counts a record already rendered as its JSON line
(gateway/runaudit.py renders each request's from the record schema's members only,
proxy/data/audit-record.schema.json) and appends it to a bounded queue. The queue is drained by
time, as lines.py's LineOut does: the first record of a batch schedules one wake-up (a loop
callback) FLUSH_INTERVAL_S later, or at once when FLUSH_LINES are queued, so requests that come
one at a time still share a batch, and its wake-up and its one write. A batch goes to the
process's stdout through the LineOut the access log shares (lines.py), on the loop, so neither
cuts the other's lines; or it is appended to `audit.path` by the trail's one writer thread (a slow
disk must not stall the event loop), which is handed the batch's bytes through a SimpleQueue and
reports each outcome back to the loop. One batch is out at a time: what is queued meanwhile goes
when it reports. The thread touches the sink only; the counts, the held lines and the warnings are
the loop's.

When records cannot be kept (the queue is full, the sink cannot be written: disk full, an
unwritable file, a deleted directory) `on_full` decides. `drop`: each lost record is counted
(arp_gateway_audit_dropped_total) and a warning says so at most every 10 s. `refuse`: what was
queued is kept and retried, and `accepting` is False (the pipeline answers run starts and cancels
503 audit_unavailable) until a write succeeds again.

The file is reopened when its path no longer names the file held open (logrotate renames it and
creates a new one: what was written before the check is in the old file, what after in the new;
checked with one stat per batch) and on `reopen()` (SIGHUP). A write that a full disk cuts short
leaves part of a line; the next write starts on a new line, so every other line stays valid.
`close()` writes what is queued but waits at most CLOSE_WAIT_S, for a disk that hangs: what did
not get out by then is counted dropped.

    trail = AuditTrail(cfg.audit, clock, metrics)
    trail.start()
    if not trail.accepting: ...   # refuse mode: the sink is failing or the queue is full
    trail.record(b'{"time":"...","event":"run.get",...}\n', ("run.get", "allow"))
    trail.reopen()                # SIGHUP
    await trail.close()
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Protocol, TextIO

from ..settings.models import AuditConfig, AuditOnFull, AuditSink
from ..util.clock import Clock
from .lines import FLUSH_INTERVAL_S, FLUSH_LINES, shared

log = logging.getLogger("proxy.observability.audit")

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "audit-record.schema.json"
WARN_INTERVAL_S = 10.0
# refuse: a batch that failed is tried again when the next record comes, or after this long.
RETRY_S = 1.0
# close(): how long the last batches (and a write already under way) may take. A disk that hangs
# must not hold the gateway's exit; what has not got out by then is counted dropped.
CLOSE_WAIT_S = 5.0
FILE_MODE = 0o640   # records name people: readable by the owner and its group (a log shipper), no one else
EVENTS = ("run.start", "run.get", "run.cancel", "run.events")
DECISIONS = ("allow", "deny")


class AuditMetrics(Protocol):
    """Where the trail counts (GatewayMetrics)."""

    audit_records: dict[tuple[str, str], int]   # records made, by (event, decision)

    def audit_dropped(self, count: int) -> None: ...


def schema() -> dict[str, Any]:
    """The JSON Schema of a record (draft 2020-12)."""
    with SCHEMA_PATH.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


class WriteFailed(Exception):
    """A batch did not get out whole: `written` of its bytes did."""

    def __init__(self, written: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.written = written
        self.cause = cause


class _StdoutSink:
    threaded = False   # shares the access log's LineOut, which lives on the loop
    where = "stdout"

    def __init__(self, out: TextIO) -> None:
        self._lines = shared(out)
        self.opens = 0

    def open(self) -> None:
        pass

    def reopen(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        try:
            self._lines.write(data.decode())
        except (OSError, ValueError) as exc:
            raise WriteFailed(0, exc) from None

    def close(self) -> None:
        pass


class _FileSink:
    threaded = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = path
        self.opens = 0             # files opened, for tests and diagnosis
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._reopen = False
        self._torn = False         # the file ends inside a line a failed write cut

    def reopen(self) -> None:
        self._reopen = True

    def open(self) -> int:
        """The descriptor to write to: the one held while the path still names its file."""
        fd = self._fd
        if fd is not None and not self._reopen:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None          # renamed away and not created again yet: this writer creates it
            if st is not None and (st.st_dev, st.st_ino) == self._id:
                return fd
        self._reopen = False
        self.close()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._id = fd, (st.st_dev, st.st_ino)
        self.opens += 1
        return fd

    def write(self, batch: bytes) -> None:
        # One write of the whole batch, O_APPEND: several workers appending to one file do not
        # interleave inside a batch. A short write is only continued, never repeated.
        data = memoryview((b"\n" + batch) if self._torn else batch)
        lead = len(data) - len(batch)
        done = 0
        try:
            fd = self.open()
            while done < len(data):
                n = os.write(fd, data[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "write wrote nothing")
                done += n
        except OSError as exc:
            if done:
                self._torn = data[done - 1] != ord("\n")
            self.close()           # the next batch opens the path again: it may be writable by then
            raise WriteFailed(max(0, done - lead), exc) from None
        self._torn = False

    def close(self) -> None:
        fd, self._fd, self._id = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _serve(jobs: SimpleQueue[bytes | None], sink: _FileSink | _StdoutSink, loop: asyncio.AbstractEventLoop,
           report: Callable[[BaseException | None], None], stopped: Callable[[], None]) -> None:
    """The writer thread's body: writes each batch it is handed and hands the outcome to the loop.
    It is given the sink and nothing else of the trail, so it cannot race the loop's bookkeeping."""
    while True:
        data = jobs.get()
        if data is None:
            break
        outcome: BaseException | None = None
        try:
            sink.write(data)
        except BaseException as exc:   # whatever one batch raises is that batch's outcome: the thread goes on
            outcome = exc
        try:
            loop.call_soon_threadsafe(report, outcome)
        except RuntimeError:
            return                     # the loop is closed: there is no one left to write for
    sink.close()
    try:
        loop.call_soon_threadsafe(stopped)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():              # close() may have stopped waiting
        future.set_result(None)


class AuditTrail:
    def __init__(self, cfg: AuditConfig, clock: Clock, metrics: AuditMetrics | None) -> None:
        if cfg.sink == AuditSink.OFF:
            raise ValueError("audit.sink is off: build no AuditTrail")
        self.clock = clock
        self._metrics = metrics
        # Counted here with metrics off too: one dict either way keeps `record` to one step.
        self._counts = metrics.audit_records if metrics is not None else \
            {(event, decision): 0 for event in EVENTS for decision in DECISIONS}
        self._size = cfg.queue_size
        self._soon = min(FLUSH_LINES, cfg.queue_size)   # queued records that wake the writer at once
        self._refuse = cfg.on_full == AuditOnFull.REFUSE
        self._sink: _FileSink | _StdoutSink = _FileSink(cfg.path) if cfg.sink == AuditSink.FILE and cfg.path \
            else _StdoutSink(sys.stdout)
        self._queue: list[bytes] = []     # rendered lines, for the next batch
        self._unwritten: list[bytes] = []  # refuse: lines of batches that failed, written before newer ones
        self._room = self._size            # lines the queue may take: queue_size less those held, 0 once closed
        self._out: list[bytes] | None = None   # the lines of the batch being written
        self._out_new = 0                 # how many of them came from the queue (not held from a failed batch)
        self._failing = False
        self._closing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None   # the queued batch's wake-up
        self._now = False                 # that wake-up is at once (FLUSH_LINES are queued)
        self._due = False                 # it came while a batch was out: the batch goes when that one reports
        self._retry: asyncio.TimerHandle | None = None   # refuse: held lines tried again after RETRY_S
        self._jobs: SimpleQueue[bytes | None] = SimpleQueue()   # batches for the writer thread
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None   # the thread closed the sink and ended
        self._waiters: list[asyncio.Future[None]] = []      # flushed() and close(), woken by each outcome
        self._tried = 0                   # queued records whose batch's outcome came back
        self._warned: dict[str, float] = {}
        self._lost = 0                    # dropped since the last warning
        # For tests and diagnosis.
        self.written = 0
        self.dropped = 0
        self.writes = 0
        self.failures = 0

    # ------------------------------------------------------------------ the request side

    def record(self, line: bytes, counted: tuple[str, str]) -> None:
        """Queues one record rendered as its line (the schema's members only, ending in a newline),
        counted under its (event, decision); never blocks, never raises."""
        try:
            self._counts[counted] += 1
            queue = self._queue
            if len(queue) >= self._room:
                self._drop(1, "the audit trail is closed" if self._closed else "the audit queue is full")
                return
            queue.append(line)
            if len(queue) >= self._soon:
                if not self._now and self._loop is not None:
                    self._wake_at_once()
            elif self._timer is None and self._loop is not None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL_S, self._wake_up)
        except Exception:
            self.failed_record()

    def failed_record(self) -> None:
        """A record that could not be made (a bug in its maker): counted lost, said once per interval."""
        self._complain("record", "audit record failed", exc_info=True)
        try:
            self._drop(1, "an audit record could not be made")
        except Exception:
            pass

    @property
    def accepting(self) -> bool:
        """False with `on_full: refuse` while records cannot be kept: the queue is full, or the sink
        failed and no write has succeeded since."""
        if not self._refuse:
            return True
        return not (self._failing or self._closed or len(self._queue) >= self._room)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Opens the sink and starts the writer (on the running loop)."""
        if self._loop is not None:
            return
        try:
            self._sink.open()
        except OSError as exc:
            # Not fatal: the writer tries again with each batch, and on_full says what happens meanwhile.
            self._failing = True
            log.warning("audit.path: cannot open %s: %s", self._sink.where, exc.strerror or exc,
                        extra={"event": "audit_unwritable"})
        loop = self._loop = asyncio.get_running_loop()
        if self._sink.threaded:
            self._stopped = loop.create_future()
            self._thread = threading.Thread(
                target=_serve, args=(self._jobs, self._sink, loop, self._report, partial(_settle, self._stopped)),
                name="audit-writer", daemon=True)
            self._thread.start()
        if self._queue:
            self._wake_at_once()   # recorded before start

    def reopen(self) -> None:
        """Opens the file again before the next batch (SIGHUP: the operator moved it)."""
        self._sink.reopen()
        if self._queue and not self._now and self._loop is not None and not self._closed:
            self._wake_at_once()

    async def flushed(self) -> None:
        """Returns once the writer has tried every record queued before the call (without waiting
        for the batch's wake-up)."""
        target = self._tried + (self._out_new if self._out is not None else 0) + len(self._queue)
        while self._tried < target and self._loop is not None and not self._closed:
            if self._out is None:
                if not self._queue:
                    return
                self._send()
                if self._out is None:
                    continue       # written on the loop (stdout): its outcome is in
            await self._progress()

    async def close(self) -> None:
        """Writes what is queued, then closes the sink; later records are dropped (and counted).
        Waits at most CLOSE_WAIT_S for the writer."""
        if self._closed:
            return
        self._closing = True
        loop = self._loop
        stuck = False
        if loop is not None:
            deadline = loop.time() + CLOSE_WAIT_S
            try:
                async with asyncio.timeout_at(deadline):
                    sent = False
                    while True:
                        while self._out is not None:
                            await self._progress()
                        if sent or not (self._queue or self._unwritten):
                            break
                        self._send()
                        sent = True
            except TimeoutError:
                stuck = True
        self._closed = True
        self._room = 0
        self._cancel_wake_ups()
        self._wake_waiters()       # a flushed() waiting on a stuck write returns: nothing more will be tried
        lost = len(self._out or ()) + len(self._unwritten) + len(self._queue)
        self._out, self._unwritten, self._queue = None, [], []
        if stuck:
            log.warning("audit sink %s: a write has not returned in %g s; closing without it, %d records counted "
                        "dropped", self._sink.where, CLOSE_WAIT_S, lost, extra={"event": "audit_stuck"})
        self._drop(lost, "the audit trail closed before they were written")
        thread, self._thread = self._thread, None
        if thread is None:
            self._sink.close()
            return
        self._jobs.put(None)       # the thread closes the sink: a write stuck in it still holds the descriptor
        if stuck or self._stopped is None or loop is None:
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._stopped
        except TimeoutError:
            log.warning("audit writer thread did not end in %g s", CLOSE_WAIT_S, extra={"event": "audit_stuck"})

    # ------------------------------------------------------------------ the writer, on the loop

    def _wake_at_once(self) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._now = True
        self._timer = self._loop.call_soon(self._wake_up)

    def _wake_up(self) -> None:
        """The batch's wake-up (and refuse's retry)."""
        try:
            if self._out is not None:
                self._due = True   # one batch out at a time: this one goes when that one reports
                return
            self._send()
        except Exception:
            self.failures += 1
            self._complain("writer", "audit writer iteration failed", exc_info=True)

    def _cancel_wake_ups(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()
        self._now = self._due = False

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _progress(self) -> None:
        """Returns when the batch out reports."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    def _send(self) -> None:
        """Hands what is held and queued to the sink as one batch: to the thread, or written here."""
        self._cancel_wake_ups()    # records from here on start the next batch and schedule its wake-up
        batch, self._queue = self._queue, []
        lines, self._unwritten = self._unwritten, []
        self._room = 0 if self._closed else self._size
        lines += batch
        if not lines:
            return
        self.writes += 1
        self._out, self._out_new = lines, len(batch)
        try:
            data = b"".join(lines)
            if self._thread is not None:
                self._jobs.put(data)
                return
            self._sink.write(data)
        except Exception as exc:
            self._report(exc)
        else:
            self._report(None)

    def _report(self, outcome: BaseException | None) -> None:
        """A batch's outcome, on the loop (from the writer thread through call_soon_threadsafe)."""
        lines, self._out = self._out, None
        if lines is None or self._closed:
            return                 # close() stopped waiting for this batch and counted it dropped
        try:
            self._tried += self._out_new
            if outcome is None:
                self.written += len(lines)
                if self._failing:
                    self._failing = False
                    log.warning("audit sink %s written again", self._sink.where, extra={"event": "audit_writable"})
            elif isinstance(outcome, WriteFailed):
                self._failed(lines, outcome.written, outcome.cause)
            else:
                # A bug in the sink: its batch is counted lost; the writer goes on with the next.
                self.failures += 1
                self._complain("writer", "audit writer iteration failed", exc_info=outcome)
                self._failed(lines, 0, outcome)
        except Exception:
            self.failures += 1
            self._complain("writer", "audit writer iteration failed", exc_info=True)
        finally:
            self._wake_waiters()
            if self._due:
                self._send()

    def _failed(self, lines: list[bytes], written: int, cause: BaseException) -> None:
        kept, total = lines, 0
        for i, line in enumerate(lines):
            total += len(line)
            if total > written:
                kept = lines[i:]
                break
        else:
            kept = []
        self.written += len(lines) - len(kept)
        self._failing = True
        reason = getattr(cause, "strerror", None) or type(cause).__name__
        if self._refuse:
            self._unwritten = kept
            self._room = self._size - len(kept)
            if self._retry is None and self._loop is not None and not self._closing:
                # Held lines are tried again after RETRY_S even when no record comes.
                self._retry = self._loop.call_later(RETRY_S, self._wake_up)
            self._complain("unwritable", "audit sink %s cannot be written (%s): %d records held, run starts "
                           "and cancels refused until it can", self._sink.where, reason, len(kept))
        else:
            self._drop(len(kept), f"audit sink {self._sink.where} cannot be written ({reason})")

    # ------------------------------------------------------------------ losses, said once per interval

    def _drop(self, count: int, why: str) -> None:
        if count <= 0:
            return
        self.dropped += count
        self._lost += count
        if self._metrics is not None:
            self._metrics.audit_dropped(count)
        if self._complain("dropped", "%s: %d audit records dropped", why, self._lost):
            self._lost = 0

    def _complain(self, kind: str, message: str, *args: Any, exc_info: bool | BaseException = False) -> bool:
        now = self.clock.monotonic()
        last = self._warned.get(kind)
        if last is not None and now - last < WARN_INTERVAL_S:
            return False
        self._warned[kind] = now
        log.warning(message, *args, exc_info=exc_info, extra={"event": "audit_" + kind})
        return True
