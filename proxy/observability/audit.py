"""The audit trail: one JSON line per decision on a run route, written off the request path.

`record` never blocks and never raises: it counts a record already rendered as its JSON line
(gateway/runaudit.py renders each request's from the record schema's members only,
proxy/data/audit-record.schema.json) and appends it to a bounded queue. One writer task drains
the queue by time, as lines.py's LineOut does: the first record of a batch schedules one wake-up
FLUSH_INTERVAL_S later (or at once when FLUSH_LINES are queued), so requests that come one at a
time still share a batch, and its wake-up and its one write. A batch goes to the process's stdout
through the LineOut the access log shares (lines.py), so neither cuts the other's lines, or is
appended to `audit.path` in a thread (one hop per batch: a slow disk must not stall the event loop).

When records cannot be kept (the queue is full, the sink cannot be written: disk full, an
unwritable file, a deleted directory) `on_full` decides. `drop`: each lost record is counted
(arp_gateway_audit_dropped_total) and a warning says so at most every 10 s. `refuse`: what was
queued is kept and retried, and `accepting` is False (the pipeline answers run starts and cancels
503 audit_unavailable) until a write succeeds again.

The file is reopened when its path no longer names the file held open (logrotate renames it and
creates a new one: what was written before the check is in the old file, what after in the new;
checked with one stat per batch) and on `reopen()` (SIGHUP). A write that a full disk cuts short
leaves part of a line; the next write starts on a new line, so every other line stays valid.

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
from pathlib import Path
from typing import Any, Protocol, TextIO

from ..settings.models import AuditConfig, AuditOnFull, AuditSink
from ..util.clock import Clock
from .lines import FLUSH_INTERVAL_S, FLUSH_LINES, shared

log = logging.getLogger("proxy.observability.audit")

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "audit-record.schema.json"
WARN_INTERVAL_S = 10.0
# refuse: a batch that failed is tried again when the next record comes, or after this long.
RETRY_S = 1.0
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


class AuditTrail:
    def __init__(self, cfg: AuditConfig, clock: Clock, metrics: AuditMetrics | None) -> None:
        if cfg.sink == AuditSink.OFF:
            raise ValueError("audit.sink is off: build no AuditTrail")
        self.clock = clock
        self._metrics = metrics
        self._counts = metrics.audit_records if metrics is not None else None
        self._size = cfg.queue_size
        self._soon = min(FLUSH_LINES, cfg.queue_size)   # queued records that wake the writer at once
        self._refuse = cfg.on_full == AuditOnFull.REFUSE
        self._sink: _FileSink | _StdoutSink = _FileSink(cfg.path) if cfg.sink == AuditSink.FILE and cfg.path \
            else _StdoutSink(sys.stdout)
        self._queue: list[bytes] = []     # rendered lines, for the writer
        self._unwritten: list[bytes] = []  # refuse: lines of batches that failed, written before newer ones
        self._failing = False
        self._closing = False
        self._closed = False
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None   # the pending batch's wake-up
        self._attempted = 0               # records taken into a batch the writer tried
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
            if self._counts is not None:
                self._counts[counted] += 1
            queue = self._queue
            if self._closed or len(queue) + len(self._unwritten) >= self._size:
                self._drop(1, "the audit trail is closed" if self._closed else "the audit queue is full")
                return
            queue.append(line)
            if len(queue) >= self._soon:
                self._wake.set()
            elif self._timer is None and self._loop is not None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL_S, self._wake.set)
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
        return not (self._failing or self._closed or len(self._queue) + len(self._unwritten) >= self._size)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Opens the sink and starts the writer (on the running loop)."""
        if self._task is not None:
            return
        try:
            self._sink.open()
        except OSError as exc:
            # Not fatal: the writer tries again with each batch, and on_full says what happens meanwhile.
            self._failing = True
            log.warning("audit.path: cannot open %s: %s", self._sink.where, exc.strerror or exc,
                        extra={"event": "audit_unwritable"})
        self._loop = asyncio.get_running_loop()
        if self._queue:
            self._wake.set()   # recorded before start
        self._task = self._loop.create_task(self._run(), name="audit-writer")

    def reopen(self) -> None:
        """Opens the file again before the next batch (SIGHUP: the operator moved it)."""
        self._sink.reopen()
        self._wake.set()

    async def flushed(self) -> None:
        """Returns once the writer has tried every record queued before the call (without waiting
        for the batch's wake-up)."""
        target = self._attempted + len(self._queue)
        while self._attempted < target and self._task is not None and not self._task.done():
            self._progress.clear()
            self._wake.set()
            await self._progress.wait()

    async def close(self) -> None:
        """Writes what is queued, then closes the sink; later records are dropped (and counted)."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                log.exception("audit writer failed")
        if self._queue or self._unwritten:
            try:
                await self._write_batch()
            except Exception:
                log.exception("audit writer failed")
        self._closed = True
        self._cancel_timer()
        if self._unwritten or self._queue:
            self._drop(len(self._unwritten) + len(self._queue), "the audit trail closed before they were written")
            self._unwritten, self._queue = [], []
        self._sink.close()

    # ------------------------------------------------------------------ the writer

    async def _run(self) -> None:
        wake = self._wake
        while True:
            if not wake.is_set():
                try:
                    # refuse: held lines are tried again after RETRY_S even when no record comes.
                    await asyncio.wait_for(wake.wait(), RETRY_S if self._unwritten else None)
                except TimeoutError:
                    pass
            wake.clear()
            if self._queue or self._unwritten:
                try:
                    await self._write_batch()
                except Exception:
                    # One bad iteration (a bug) must not end the trail: its batch is counted lost in
                    # _write_batch where it can be; the writer goes on with the next.
                    self.failures += 1
                    self._complain("writer", "audit writer iteration failed", exc_info=True)
            self._progress.set()
            if self._closing and not self._queue:
                return
            await asyncio.sleep(0)   # a sink failing at once must not starve the loop

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    async def _write_batch(self) -> None:
        self._cancel_timer()   # records from here on start the next batch and schedule its wake-up
        batch, self._queue = self._queue, []
        self._attempted += len(batch)
        lines, self._unwritten = self._unwritten, []
        lines += batch
        if not lines:
            return
        self.writes += 1
        sink = self._sink
        try:
            if sink.threaded:
                assert self._loop is not None
                await self._loop.run_in_executor(None, sink.write, b"".join(lines))
            else:
                sink.write(b"".join(lines))
        except WriteFailed as exc:
            self._failed(lines, exc.written, exc.cause)
        except Exception as exc:
            self._failed(lines, 0, exc)
            raise
        else:
            self.written += len(lines)
            if self._failing:
                self._failing = False
                log.warning("audit sink %s written again", sink.where, extra={"event": "audit_writable"})

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

    def _complain(self, kind: str, message: str, *args: Any, exc_info: bool = False) -> bool:
        now = self.clock.monotonic()
        last = self._warned.get(kind)
        if last is not None and now - last < WARN_INTERVAL_S:
            return False
        self._warned[kind] = now
        log.warning(message, *args, exc_info=exc_info, extra={"event": "audit_" + kind})
        return True
