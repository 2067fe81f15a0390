"""proxy/util/singleflight.py: one call in flight per key, shared by every caller, immune to one caller leaving."""

from __future__ import annotations

import asyncio

import pytest

from proxy.util.singleflight import SingleFlight


class Gate:
    """A call that waits until released, counting how often it was started."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        await self.release.wait()
        return f"result-{self.calls}"


async def test_concurrent_callers_with_one_key_share_one_call() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    waiters = [asyncio.create_task(flights.do("k", gate)) for _ in range(20)]
    await asyncio.sleep(0.01)  # every waiter has joined the flight
    assert flights.in_flight("k") and gate.calls == 1
    gate.release.set()
    assert await asyncio.gather(*waiters) == ["result-1"] * 20
    assert not flights.in_flight("k")
    assert await flights.do("k", gate) == "result-2"  # a later caller starts a new call


async def test_different_keys_do_not_share() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    gate.release.set()
    assert sorted(await asyncio.gather(flights.do("a", gate), flights.do("b", gate))) == ["result-1", "result-2"]


async def test_a_caller_giving_up_does_not_cancel_the_call_for_the_others() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    leaving = asyncio.create_task(flights.do("k", gate))
    staying = asyncio.create_task(flights.do("k", gate))
    await asyncio.sleep(0)  # both have joined the flight
    leaving.cancel()
    await asyncio.sleep(0)  # the cancellation is delivered
    assert leaving.cancelled() and not staying.done()
    gate.release.set()
    assert await staying == "result-1" and gate.calls == 1


async def test_a_failure_reaches_every_waiter_and_is_not_kept() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)  # fails after a loop turn, as real I/O would
        raise RuntimeError("down")

    results = await asyncio.gather(flights.do("k", failing), flights.do("k", failing), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError] and calls == 1
    with pytest.raises(RuntimeError):
        await flights.do("k", failing)
    assert calls == 2


async def test_a_failure_nobody_awaits_is_retrieved(caplog: pytest.LogCaptureFixture) -> None:
    flights: SingleFlight[str, str] = SingleFlight()

    async def failing() -> str:
        await asyncio.sleep(0)  # fails after a loop turn, as real I/O would
        raise RuntimeError("down")

    waiter = asyncio.create_task(flights.do("k", failing))
    await asyncio.sleep(0)  # the waiter has started the flight
    waiter.cancel()
    await asyncio.sleep(0.01)  # the abandoned flight has finished failing
    assert not flights.in_flight("k")
    assert "never retrieved" not in caplog.text


async def test_cancel_stops_every_call_in_flight() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    waiter = asyncio.create_task(flights.do("k", gate))
    await asyncio.sleep(0)  # the waiter has started the flight
    await flights.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not flights.in_flight("k")
