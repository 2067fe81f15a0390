"""limits.max_buffered_bytes: one process-wide count of the request bytes all connections hold.

    budget = Budget(limit, on_full=hold_every_connection, on_room=release_every_connection)
    budget.take(len(head)); ...; budget.give(len(head))
    if not budget.reserve(conn, content_length): ...  # conn.admitted(size) is called when it fits
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Waiter(Protocol):
    """A connection whose body waits for a reservation (edge/protocol.ClientConnection)."""

    def room_needed(self) -> int:
        """What the body still needs; 0 when it needs nothing any more."""

    def admitted(self, size: int) -> None:
        """The budget reserved `size` (0: nothing was needed) for the body that waited."""


class Budget:
    """limits.max_buffered_bytes: the head and body bytes held by all connections together.

    A body of known length is reserved whole before it is read, first come first served: were bodies
    charged as they arrive, a crowd of uploads would share the budget out in fragments and none would
    finish. Heads and chunked bodies are charged as they arrive. Full at the limit; room again only
    below three quarters of it, so that a budget hovering at the edge does not pause and resume every
    connection once per request."""

    __slots__ = ("limit", "used", "full", "ceiling", "_low", "on_full", "on_room", "waiting")

    def __init__(self, limit: int, on_full: Callable[[], None], on_room: Callable[[], None]) -> None:
        self.limit = limit
        self.used = 0
        self.full = False
        self.ceiling = limit + limit // 4  # new connections are turned away past it (see edge/listener.Listener.admit)
        self._low = limit * 3 // 4
        self.on_full = on_full
        self.on_room = on_room
        self.waiting: dict[Waiter, None] = {}  # bodies waiting for a reservation, oldest first

    def take(self, size: int) -> None:
        self.used += size
        if self.used >= self.limit and not self.full:
            self.full = True
            self.on_full()

    def give(self, size: int) -> None:
        self.used -= size
        if self.waiting:
            self._admit()
        if self.full and self.used <= self._low:
            self.full = False
            self.on_room()

    def reserve(self, conn: Waiter, size: int) -> bool:
        """Takes `size` for a body now if it fits and nobody waits before it; else queues `conn`."""
        if not self.waiting and self.used + size <= self.limit:
            self.take(size)
            return True
        self.waiting[conn] = None
        return False

    def forget(self, conn: Waiter) -> None:
        self.waiting.pop(conn, None)

    def _admit(self) -> None:
        waiting = self.waiting
        while waiting:
            conn = next(iter(waiting))
            need = conn.room_needed()
            if need > 0 and self.used + need > self.limit:
                return
            del waiting[conn]
            if need > 0:
                self.take(need)
            conn.admitted(need)
