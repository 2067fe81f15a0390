"""Event streams open at once, per principal.

An event stream holds a coordinator connection for as long as its run lasts,
so one caller opening many could take the whole pool from everyone else. Each
principal (a token subject at its issuer, or the client address for the
anonymous principal, as the run-start rate limit keys them) may hold at most
`limit` streams; the next one is refused until one of them ends.

    streams = StreamLimiter(limit=8)
    if not streams.enter(request, key):   # refused: too many open
        ...
    streams.leave(request)                # at every end of the request; a second call does nothing

Memory: a key is kept only while it has a stream open, and a request only
while it is open, so both are bounded by the open client connections.
"""

from __future__ import annotations

from collections.abc import Hashable


class StreamLimiter:
    def __init__(self, *, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._open: dict[str, int] = {}
        # Which key each open request counts against, so leaving is idempotent: a request's end is
        # reported once by the relay and possibly again by the listener when its client left.
        self.holding: dict[Hashable, str] = {}
        self.refused = 0

    def __len__(self) -> int:
        return len(self.holding)

    def open(self, key: str) -> int:
        return self._open.get(key, 0)

    def enter(self, request: Hashable, key: str) -> bool:
        """Counts `request` against `key`; False (nothing counted) when `key` already holds `limit`."""
        held = self._open.get(key, 0)
        if held >= self.limit:
            self.refused += 1
            return False
        self._open[key] = held + 1
        self.holding[request] = key
        return True

    def leave(self, request: Hashable) -> None:
        key = self.holding.pop(request, None)
        if key is None:
            return
        held = self._open[key] - 1
        if held:
            self._open[key] = held
        else:
            del self._open[key]
