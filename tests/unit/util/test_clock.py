"""proxy/util/clock.py: the system clock, and the fake one every expiry and cooldown test moves."""

from __future__ import annotations

import time

from proxy.util.clock import Clock, FakeClock, SystemClock


def test_the_fake_clock_moves_only_when_told_and_both_readings_together(clock: FakeClock) -> None:
    wall, mono = clock.time(), clock.monotonic()
    assert (clock.time(), clock.monotonic()) == (wall, mono)
    clock.advance(90.5)
    assert (clock.time(), clock.monotonic()) == (wall + 90.5, mono + 90.5)


def test_the_fixture_clock_starts_at_the_real_time_in_whole_seconds(clock: FakeClock) -> None:
    # Tokens from the real IdP carry real iat/exp: they must be valid on the clock the gateway is given.
    assert clock.time() == int(clock.time())
    assert abs(clock.time() - time.time()) < 60


def test_the_system_clock_reads_the_real_clocks() -> None:
    system: Clock = SystemClock()
    assert abs(system.time() - time.time()) < 60
    first = system.monotonic()
    assert system.monotonic() >= first
