"""The audit trail's writer on the real file system, with the injected clock.

Nothing sleeps: a test records, then awaits the writer (`flushed`) and reads the file. The full
disk is a small tmpfs when one can be mounted (root), and /dev/full, or a symlink swapped from
/dev/full to a file, everywhere.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from proxy.observability import audit
from proxy.observability.audit import AuditTrail
from proxy.observability.metrics import GatewayMetrics
from proxy.settings.models import AuditConfig
from proxy.util.clock import FakeClock, rfc3339_millis

VALIDATOR = Draft202012Validator(audit.schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def full_record(n: int) -> dict[str, Any]:
    return {"event": ("run.start", "run.get", "run.cancel", "run.events")[n % 4],
            "decision": "deny" if n % 3 == 0 else "allow", "reason": "not_owner" if n % 3 == 0 else None,
            "statement_id": "OwnersOnly", "policy_hash": "sha256:" + "ab" * 32, "status": 404 if n % 3 == 0 else 200,
            "request_id": f"req-{n}", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "run_id": f"run-{n}",
            "node_type": {"id": "jarvis.composite.planner", "version": "1.0.0"} if n % 4 == 0 else None,
            "principal": {"iss": "https://idp.example", "sub": "alice", "tenant": "A", "client_id": "cli"},
            "token_id": "0123456789abcdef", "client_address": "10.0.0.7"}


def put(trail: AuditTrail, fields: dict[str, Any]) -> None:
    """One record as gateway/runaudit.py hands it over: its line, stamped from the trail's clock."""
    line = json.dumps({"time": rfc3339_millis(trail.clock.time()), **fields}, separators=(",", ":")) + "\n"
    trail.record(line.encode(), (fields["event"], fields["decision"]))


def trail_for(path: Path | str, clock: FakeClock | None = None, *, on_full: str = "drop",
              queue_size: int = 10000, metrics: GatewayMetrics | None = None) -> AuditTrail:
    cfg = AuditConfig(sink="file", path=str(path), on_full=on_full, queue_size=queue_size)
    return AuditTrail(cfg, clock or FakeClock(), metrics)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counter(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fills the file system of `directory` to the last byte; the filler's path frees it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for _ in range(10_000):
            try:
                f.write(b"x" * 1024)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            pytest.fail("the file system never filled up")
    return filler


# --------------------------------------------------------------------------- what is written


async def test_records_are_written_in_order_each_one_line_valid_against_the_schema(tmp_path: Path) -> None:
    clock = FakeClock()
    trail = trail_for(tmp_path / "audit.log", clock)
    trail.start()
    for n in range(40):
        put(trail, full_record(n))
        clock.advance(0.125)
        if n % 7 == 0:
            await trail.flushed()   # several batches, each appended after the last
    await trail.close()
    written = lines_of(tmp_path / "audit.log")
    assert [r["request_id"] for r in written] == [f"req-{n}" for n in range(40)]
    for record in written:
        VALIDATOR.validate(record)
    assert written[0]["time"] == "2027-01-15T08:00:00.000Z"
    assert written[2]["time"] == "2027-01-15T08:00:00.250Z"
    assert list(written[0])[0] == "time"
    umask = os.umask(0)
    os.umask(umask)
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == oct(audit.FILE_MODE & ~umask)


def test_the_schema_is_draft_2020_12_and_refuses_any_other_member() -> None:
    Draft202012Validator.check_schema(audit.schema())
    assert audit.schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    record = {"time": "2027-01-15T08:00:00.000Z", **full_record(1)}
    VALIDATOR.validate(record)
    for stray in ({"token": TOKEN}, {"input": {"prompt": "hi"}}):
        assert not VALIDATOR.is_valid({**record, **stray})
    assert not VALIDATOR.is_valid({**record, "principal": {"sub": "alice", "token": TOKEN}})
    assert not VALIDATOR.is_valid({**record, "time": "2027-01-15T08:00:00Z"})


async def test_lines_are_written_as_given_in_order_and_counted(tmp_path: Path) -> None:
    metrics = GatewayMetrics([])
    trail = trail_for(tmp_path / "audit.log", metrics=metrics)
    trail.start()
    line = json.dumps({"time": "2027-01-15T08:00:00.000Z", **full_record(0)}, separators=(",", ":")) + "\n"
    trail.record(line.encode(), ("run.start", "deny"))
    put(trail, full_record(1))
    trail.record(line.replace("req-0", "req-2").encode(), ("run.start", "deny"))
    await trail.close()
    text = (tmp_path / "audit.log").read_text()
    assert text.splitlines()[0] + "\n" == line
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log")] == ["req-0", "req-1", "req-2"]
    assert counter(metrics, "arp_gateway_audit_records_total", event="run.start", decision="deny") == 2


async def test_a_batch_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls: list[int] = []

    def counted(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(audit.os, "write", counted)
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    for n in range(500):          # all in one loop iteration: the writer takes them as one batch
        put(trail, full_record(n))
    assert calls == []            # nothing written on the caller's path
    await trail.flushed()
    assert len(calls) == 1
    assert len(lines_of(tmp_path / "audit.log")) == 500
    await trail.close()


async def test_records_that_come_one_at_a_time_share_a_batch_and_its_one_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    real_write = os.write
    calls: list[int] = []

    def counted(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(audit.os, "write", counted)
    monkeypatch.setattr(audit, "FLUSH_INTERVAL_S", 0.05)
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    for n in range(10):           # as requests come, each in loop iterations of its own
        put(trail, full_record(n))
        for _ in range(5):
            await asyncio.sleep(0)
    for _ in range(200):          # bounded: the batch's wake-up is due after FLUSH_INTERVAL_S
        if trail.written == 10:
            break
        await asyncio.sleep(0.01)
    assert calls and len(calls) == 1
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log")] == [f"req-{n}" for n in range(10)]
    await trail.close()


async def test_stdout_batches_go_through_the_access_logs_line_batches_whole(capsys: pytest.CaptureFixture) -> None:
    import sys

    from proxy.observability.accesslog import AccessLog

    access = AccessLog(sys.stdout, log_subject=False)
    trail = AuditTrail(AuditConfig(sink="stdout"), FakeClock(), None)
    trail.start()
    access.record("r1", "GET", "/v1/runs/{run_id}", 200, 0.001, None, 0, 2, "allowed", "", None, "127.0.0.1",
                  None, None, "run-1")
    for n in range(3):
        put(trail, full_record(n))
    await trail.flushed()
    out = capsys.readouterr().out.splitlines()
    # The access line batched before the audit batch is written with it, first; nothing is cut.
    assert [json.loads(line).get("type", "audit") for line in out] == ["access", "audit", "audit", "audit"]
    await trail.close()


async def test_close_writes_what_is_queued_and_later_records_are_counted_lost(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    trail = trail_for(tmp_path / "audit.log", metrics=metrics)
    trail.start()
    for n in range(10):
        put(trail, full_record(n))
    await trail.close()
    assert len(lines_of(tmp_path / "audit.log")) == 10
    put(trail, full_record(11))
    assert counter(metrics, "arp_gateway_audit_dropped_total") == 1
    assert counter(metrics, "arp_gateway_audit_records_total", event="run.get", decision="allow") == 2


# --------------------------------------------------------------------------- rotation and SIGHUP


async def test_rotation_by_rename_and_create_loses_no_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    n = 0
    for rotation in range(1, 4):
        for _ in range(25):
            put(trail, full_record(n))
            n += 1
            if n % 10 == 0:
                await trail.flushed()
        # logrotate: rename, then create the new file, with records still queued for the writer.
        os.rename(path, tmp_path / f"audit.log.{rotation}")
        path.touch()
        for _ in range(5):
            put(trail, full_record(n))
            n += 1
    await trail.close()
    files = [tmp_path / f"audit.log.{r}" for r in (1, 2, 3)] + [path]
    seen = [record["request_id"] for f in files for record in lines_of(f)]
    assert seen == [f"req-{i}" for i in range(n)]       # each record once, in order, across the files
    assert all(lines_of(f) for f in files)              # every generation got records
    assert trail._sink.opens == 4


async def test_a_rotation_without_create_has_the_writer_create_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    put(trail, full_record(0))
    await trail.flushed()
    os.rename(path, tmp_path / "audit.log.1")
    put(trail, full_record(1))
    await trail.close()
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log.1")] == ["req-0"]
    assert [r["request_id"] for r in lines_of(path)] == ["req-1"]


async def test_reopen_opens_the_path_again_before_the_next_batch(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    put(trail, full_record(0))
    await trail.flushed()
    assert trail._sink.opens == 1
    trail.reopen()                 # what SIGHUP does (runtime/server.py's reload hooks)
    put(trail, full_record(1))
    await trail.flushed()
    assert trail._sink.opens == 2
    put(trail, full_record(2))
    await trail.close()
    assert trail._sink.opens == 2  # and only then: the path still names the same file
    assert [r["request_id"] for r in lines_of(path)] == ["req-0", "req-1", "req-2"]


# --------------------------------------------------------------------------- when records cannot be kept


async def test_drop_on_a_full_device_counts_each_record_and_warns_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    metrics = GatewayMetrics()
    trail = trail_for("/dev/full", clock, metrics=metrics)
    trail.start()
    with caplog.at_level(logging.WARNING, logger="proxy.observability.audit"):
        for _ in range(3):
            for n in range(4):
                put(trail, full_record(n))
            assert trail.accepting                     # drop: requests are never refused
            await trail.flushed()
        clock.advance(audit.WARN_INTERVAL_S)
        put(trail, full_record(0))
        await trail.flushed()
    assert trail.dropped == 13 and trail.written == 0
    assert counter(metrics, "arp_gateway_audit_dropped_total") == 13
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 2
    assert "/dev/full" in warnings[0] and "No space left on device" in warnings[0]
    assert warnings[1].endswith(": 9 audit records dropped")     # what was lost since the last warning
    await trail.close()


async def test_refuse_turns_accepting_off_while_the_file_cannot_be_written_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.symlink_to("/dev/full")  # a disk that is full...
    trail = trail_for(tmp_path / "audit.log", on_full="refuse")
    trail.start()
    for n in range(5):
        put(trail, full_record(n))
    await trail.flushed()
    assert not trail.accepting and trail.dropped == 0
    put(trail, full_record(5))  # reads still record while starts are refused
    await trail.flushed()
    assert not trail.accepting
    real = tmp_path / "audit.real"
    real.touch()
    os.replace(tmp_path / "audit.real", path)    # ...has room again: a file at the path
    put(trail, full_record(6))
    await trail.flushed()
    assert trail.accepting
    await trail.close()
    assert [r["request_id"] for r in lines_of(path)] == [f"req-{n}" for n in range(7)]
    assert trail.dropped == 0


async def test_a_deleted_directory_drops_until_it_is_back(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.log"
    trail = trail_for(path)
    trail.start()
    put(trail, full_record(0))
    await trail.flushed()
    path.unlink()
    directory.rmdir()
    put(trail, full_record(1))
    await trail.flushed()
    assert trail.dropped == 1
    directory.mkdir()
    put(trail, full_record(2))
    await trail.close()
    assert [r["request_id"] for r in lines_of(path)] == ["req-2"]


async def test_a_full_tmpfs_with_drop_keeps_recording_counts_and_resumes(tmpfs: Path) -> None:
    path = tmpfs / "audit.log"
    metrics = GatewayMetrics()
    trail = trail_for(path, metrics=metrics)
    trail.start()
    put(trail, full_record(0))
    await trail.flushed()
    filler = fill(tmpfs)
    for n in range(1, 101):       # more than the room left in the file's last page
        put(trail, full_record(n))
    await trail.flushed()
    assert trail.accepting
    lost = trail.dropped
    assert 0 < lost < 100 and counter(metrics, "arp_gateway_audit_dropped_total") == lost
    filler.unlink()
    put(trail, full_record(101))
    await trail.close()
    raw = path.read_text().splitlines()
    valid = [json.loads(line) for line in raw if line.endswith("}") and line.startswith("{")]
    assert len(raw) - len(valid) <= 1              # at most the one line the full disk cut
    for record in valid:
        VALIDATOR.validate(record)
    ids = [r["request_id"] for r in valid]
    assert ids[0] == "req-0" and ids[-1] == "req-101"
    assert len(ids) == 102 - lost


async def test_a_full_tmpfs_with_refuse_holds_the_records_and_writes_each_once_after(tmpfs: Path) -> None:
    path = tmpfs / "audit.log"
    trail = trail_for(path, on_full="refuse")
    trail.start()
    put(trail, full_record(0))
    await trail.flushed()
    filler = fill(tmpfs)
    for n in range(1, 101):
        put(trail, full_record(n))
    await trail.flushed()
    assert not trail.accepting and trail.dropped == 0
    filler.unlink()
    put(trail, full_record(101))
    await trail.flushed()
    assert trail.accepting
    await trail.close()
    raw = path.read_text().splitlines()
    valid = [json.loads(line) for line in raw if line.endswith("}") and line.startswith("{")]
    assert len(raw) - len(valid) <= 1
    assert [r["request_id"] for r in valid] == [f"req-{n}" for n in range(102)]


async def test_a_full_queue_drops_and_counts_with_drop(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    trail = trail_for(tmp_path / "audit.log", queue_size=5, metrics=metrics)
    trail.start()
    for n in range(8):
        put(trail, full_record(n))
    assert trail.accepting
    await trail.close()
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log")] == [f"req-{n}" for n in range(5)]
    assert counter(metrics, "arp_gateway_audit_dropped_total") == 3
    assert sum(counter(metrics, "arp_gateway_audit_records_total", event=e, decision=d)
               for e in audit.EVENTS for d in audit.DECISIONS) == 8


async def test_a_full_queue_turns_accepting_off_with_refuse_until_written(tmp_path: Path) -> None:
    trail = trail_for(tmp_path / "audit.log", on_full="refuse", queue_size=5)
    trail.start()
    for n in range(4):
        put(trail, full_record(n))
    assert trail.accepting
    put(trail, full_record(4))
    assert not trail.accepting
    await trail.flushed()
    assert trail.accepting
    await trail.close()


async def test_a_failing_iteration_does_not_stop_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    real_write = trail._sink.write
    failures = iter([RuntimeError("injected")])

    def flaky(text: str) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_write(text)

    monkeypatch.setattr(trail._sink, "write", flaky)
    with caplog.at_level(logging.WARNING, logger="proxy.observability.audit"):
        put(trail, full_record(0))
        await trail.flushed()
        put(trail, full_record(1))
        await trail.flushed()
    assert trail.failures == 1 and trail.dropped == 1
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log")] == ["req-1"]
    assert any("iteration failed" in r.getMessage() and r.exc_info for r in caplog.records)
    await trail.close()


def test_record_never_raises_even_before_start_or_with_broken_metrics(tmp_path: Path) -> None:
    broken = GatewayMetrics([])
    broken.audit_records.clear()   # no pair to count under: counting raises

    trail = trail_for(tmp_path / "a.log", metrics=broken)
    put(trail, full_record(0))
    assert trail.dropped == 1          # counted lost, not raised
    trail = trail_for(tmp_path / "audit.log")
    put(trail, full_record(0))   # before start: queued, written once started
    assert trail.accepting


def test_an_off_sink_builds_no_trail() -> None:
    with pytest.raises(ValueError):
        AuditTrail(AuditConfig(), FakeClock(), None)


def test_stdout_sink_write_failures_are_sink_failures() -> None:
    out = io.StringIO()
    out.close()
    sink = audit._StdoutSink(out)
    with pytest.raises(audit.WriteFailed):
        sink.write(b"{}\n")


# --------------------------------------------------------------------------- the writer thread


async def wait_until(done: Any, what: str) -> None:
    """Polls `done()` for at most 5 s (bounded: a writer that hangs fails the test, not the run)."""
    import asyncio

    for _ in range(500):
        if done():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


async def test_the_file_is_written_on_one_writer_thread_that_survives_a_failing_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import threading

    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    real_write = trail._sink.write
    threads: list[threading.Thread] = []

    def flaky(data: bytes) -> None:
        threads.append(threading.current_thread())
        if len(threads) == 1:
            raise RuntimeError("a bug in the sink")
        real_write(data)

    monkeypatch.setattr(trail._sink, "write", flaky)
    with caplog.at_level(logging.WARNING, logger="proxy.observability.audit"):
        for n in range(3):
            put(trail, full_record(n))
            await asyncio.wait_for(trail.flushed(), 5)
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log")] == ["req-1", "req-2"]
    assert trail.dropped == 1 and trail.failures == 1
    assert any("iteration failed" in r.getMessage() and r.exc_info for r in caplog.records)
    # Every batch on the one dedicated thread, off the loop's, and it is still there.
    assert len({id(t) for t in threads}) == 1
    assert threads[0].name == "audit-writer" and threads[0] is not threading.current_thread()
    assert threads[0].is_alive()
    await asyncio.wait_for(trail.close(), 5)
    threads[0].join(5)
    assert not threads[0].is_alive()        # close() ends it, and it closed the file
    assert trail._sink._fd is None


async def test_a_failing_outcome_on_the_loop_is_counted_and_the_writer_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    class BrokenOnce(GatewayMetrics):
        broke = False

        def audit_dropped(self, count: int) -> None:
            if not self.broke:
                self.broke = True
                raise RuntimeError("a bug in counting")
            super().audit_dropped(count)

    metrics = BrokenOnce()
    trail = trail_for("/dev/full", metrics=metrics)
    trail.start()
    with caplog.at_level(logging.WARNING, logger="proxy.observability.audit"):
        put(trail, full_record(0))
        await asyncio.wait_for(trail.flushed(), 5)
        put(trail, full_record(1))
        await asyncio.wait_for(trail.flushed(), 5)
    assert trail.failures == 1
    assert any("iteration failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert trail.dropped == 2 and counter(metrics, "arp_gateway_audit_dropped_total") == 1   # the second one counted
    await asyncio.wait_for(trail.close(), 5)


async def test_one_batch_is_out_at_a_time_and_what_comes_meanwhile_goes_next_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading

    monkeypatch.setattr(audit, "FLUSH_INTERVAL_S", 0.01)
    trail = trail_for(tmp_path / "audit.log")
    trail.start()
    real_write = trail._sink.write
    release = threading.Event()
    calls: list[int] = []

    def slow(data: bytes) -> None:
        calls.append(data.count(b"\n"))
        release.wait(5)
        real_write(data)

    monkeypatch.setattr(trail._sink, "write", slow)
    try:
        put(trail, full_record(0))
        await wait_until(lambda: calls, "the first batch to reach the sink")
        for n in range(1, 4):
            put(trail, full_record(n))
            await asyncio.sleep(0.03)       # past each wake-up: the batch is due while the first is out
        assert calls == [1]
    finally:
        release.set()
    await asyncio.wait_for(trail.flushed(), 5)
    assert calls == [1, 3]
    assert [r["request_id"] for r in lines_of(tmp_path / "audit.log")] == [f"req-{n}" for n in range(4)]
    await asyncio.wait_for(trail.close(), 5)


async def test_close_gives_up_on_a_write_stuck_in_the_disk_and_counts_what_did_not_get_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import threading

    monkeypatch.setattr(audit, "CLOSE_WAIT_S", 0.2)
    metrics = GatewayMetrics()
    trail = trail_for(tmp_path / "audit.log", metrics=metrics)
    trail.start()
    release = threading.Event()
    entered = threading.Event()

    def stuck(data: bytes) -> None:
        entered.set()
        release.wait(10)     # a disk that hangs (bounded, so the thread ends with the test)

    monkeypatch.setattr(trail._sink, "write", stuck)
    thread = trail._thread
    try:
        for n in range(3):
            put(trail, full_record(n))
        waiting = asyncio.ensure_future(trail.flushed())
        await wait_until(entered.is_set, "the batch to reach the sink")
        for n in range(3, 5):
            put(trail, full_record(n))
        with caplog.at_level(logging.WARNING, logger="proxy.observability.audit"):
            await asyncio.wait_for(trail.close(), 5)
        await asyncio.wait_for(waiting, 1)       # a flushed() waiting on the stuck write returns too
        assert trail.dropped == 5 and counter(metrics, "arp_gateway_audit_dropped_total") == 5
        assert any("has not returned" in r.getMessage() and "5 records" in r.getMessage() for r in caplog.records)
        put(trail, full_record(5))
        assert trail.dropped == 6
    finally:
        release.set()
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()     # once its write returns, the thread closes the file and ends
    assert trail._sink._fd is None
    assert trail.dropped == 6 and trail.written == 0   # the late outcome changes nothing


async def test_refuse_tries_held_records_again_after_retry_s_with_no_new_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "RETRY_S", 0.05)
    path = tmp_path / "audit.log"
    path.symlink_to("/dev/full")
    trail = trail_for(path, on_full="refuse")
    trail.start()
    for n in range(3):
        put(trail, full_record(n))
    await trail.flushed()
    assert not trail.accepting
    real = tmp_path / "audit.real"
    real.touch()
    os.replace(real, path)
    await wait_until(lambda: trail.accepting, "the held records to be written again")   # no record came
    assert [r["request_id"] for r in lines_of(path)] == ["req-0", "req-1", "req-2"]
    assert trail.dropped == 0
    await trail.close()
