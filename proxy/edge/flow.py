"""Flow control of one client connection, both ways.

Reading: the transport reads while the connection wants more (it does not
when a whole request waits its turn, or parsing stopped) and the buffer
budget lets it (edge/budget.py: while it is full no connection reads, but a
body whose bytes are already reserved). Writing: when the client stops
reading and the transport's buffer fills, streams wait in `drain()` and the
unsent bytes get `limits.send_timeout_s` (the send deadline, kept by the
listener's sweep) before the connection is aborted.

`FlowControl` is a base class of `ClientConnection` (edge/protocol.py), not an
object of its own: these run inside every read and answer, and a base class
costs no extra object or call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ClientGone

if TYPE_CHECKING:
    from .budget import Budget
    from .listener import EdgeLimits, Listener
    from .request import Request


class FlowControl:
    """Reading paused, resumed and held for the budget; writing paused, drained and timed."""

    # Kept by ClientConnection (set in its __init__).
    listener: Listener
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _clock: Callable[[], float]
    _limits: EdgeLimits
    _budget: Budget
    closed: bool
    lost: bool
    send_deadline: float        # unsent answer bytes must drain by then (limits.send_timeout_s); 0: none
    write_paused: bool
    _drain: asyncio.Future[None] | None
    _parsing: Request | None
    _advance_when_drained: bool
    _stopped: bool
    _held: bytes
    _reading: bool              # the connection wants to read
    _transport_reading: bool    # what the transport was last told
    _head_charge: int           # what the head being parsed counts against the budget
    _budget_held: bool          # the budget is full: not reading, whatever _reading says
    _awaiting_room: bool        # this body's reservation waits in the budget's queue
    _reserved_body: bool        # reading a body whose bytes are reserved: exempt from the hold
    _advance: Callable[[], None]
    abort: Callable[[], None]

    # -- writing

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self._clock() + self._limits.send_timeout_s

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = 0.0
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._advance_when_drained:
            self._advance_when_drained = False
            self._advance()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone()
        if self.write_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def send_expired(self) -> None:
        """Answer bytes stayed unread for limits.send_timeout_s: the socket is freed, the bytes dropped."""
        self.send_deadline = 0.0
        self.listener.closed_for("send_timeout")
        self.abort()

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size() if not self.lost else 0

    # -- reading

    def _pause_reading(self) -> None:
        if self._reading and not self.closed:
            self._reading = False
            self._apply_reading()

    def _resume_reading(self) -> None:
        if not self._reading and not self.closed and not self._stopped and not self._held:
            self._reading = True
            self._apply_reading()

    def hold_reading(self) -> None:
        """The budget is full: read nothing more until it has room (but a reserved body, paid for)."""
        if not self._budget_held:
            self._budget_held = True
            self._apply_reading()

    def release_reading(self) -> None:
        if self._budget_held:
            self._budget_held = False
            self._apply_reading()

    def room_needed(self) -> int:
        """What the body waiting for a reservation still needs (0: it needs nothing any more)."""
        request = self._parsing
        if self.closed or request is None or request.content_length is None:
            return 0
        return max(0, request.content_length - request.body_size)

    def admitted(self, size: int) -> None:
        """The budget reserved `size` more for the body that waited (0: it no longer needs any)."""
        self._awaiting_room = False
        request = self._parsing
        if size and request is not None:
            request._held += size
            self._reserved_body = True
        self._apply_reading()

    def _apply_reading(self) -> None:
        """The transport reads when the connection wants to and the budget lets it."""
        want = (self._reading and not self._awaiting_room and (self._reserved_body or not self._budget_held))
        if want is not self._transport_reading and not self.closed:
            self._transport_reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- the memory budget: what this connection holds in it

    def _release(self, request: Request) -> None:
        held = request._held
        if held:
            request._held = 0
            self._budget.give(held)

    def _uncharge_head(self) -> None:
        charge = self._head_charge
        if charge:
            self._head_charge = 0
            self._budget.give(charge)
