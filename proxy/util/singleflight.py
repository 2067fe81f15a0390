"""Single flight: concurrent callers asking for the same key share one call in flight.

    flights: SingleFlight[str, Keys] = SingleFlight()
    keys = await flights.do(issuer, lambda: fetch(issuer))   # one fetch however many wait

The shared call runs as its own task. A caller that gives up (a client
disconnect cancels its request) stops waiting, but the call goes on for the
others; its outcome is retrieved even when nobody waits for it any more, so a
failure nobody awaited is not logged as "never retrieved".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}

    def in_flight(self, key: K) -> bool:
        return key in self._inflight

    async def do(self, key: K, call: Callable[[], Awaitable[V]], *, name: str | None = None) -> V:
        """The result of `call()`, or of the call already in flight for `key`."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_task(call(), name=name)  # type: ignore[arg-type]
            self._inflight[key] = future
            future.add_done_callback(partial(self._done, key))
        # Shielded: one caller giving up must not cancel the call the other waiters share.
        return await asyncio.shield(future)

    def _done(self, key: K, future: asyncio.Future[V]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved here so a call nobody awaited does not log noise

    async def cancel(self) -> None:
        """Cancels every call in flight and waits for them to end."""
        futures = list(self._inflight.values())
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
