"""The deadline sweep, one pass at a time (edge/sweep.py)."""

from __future__ import annotations

import logging

from proxy.edge.sweep import DeadlineSweep


def test_one_failing_item_does_not_keep_the_others_from_expiring(caplog):
    expired = []

    def expire(item: str, now: float) -> None:
        if item == "bad":
            raise RuntimeError("injected")
        expired.append((item, now))

    sweep = DeadlineSweep("test", 1.0, due=lambda now: ["a", "bad", "b"], expire=expire, log_interval_s=10)
    with caplog.at_level(logging.ERROR, logger="proxy.edge.sweep"):
        sweep.run(5.0)
        sweep.run(6.0)    # within log_interval_s: counted, not logged again
        sweep.run(15.0)
    assert expired == [("a", 5.0), ("b", 5.0), ("a", 6.0), ("b", 6.0), ("a", 15.0), ("b", 15.0)]
    assert sweep.failures == 3
    assert len([r for r in caplog.records if r.name == "proxy.edge.sweep"]) == 2


def test_a_failing_due_is_counted_and_the_next_pass_runs():
    calls = []

    def due(now: float) -> list[int]:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return [1]

    expired = []
    sweep = DeadlineSweep("test", 1.0, due=due, expire=lambda item, now: expired.append(item))
    sweep.run(1.0)
    sweep.run(2.0)
    assert sweep.failures == 1 and expired == [1]
