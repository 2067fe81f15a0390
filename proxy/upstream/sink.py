"""What `upstream/` tells the metrics: a protocol, so the way to the coordinator does not depend
on the concrete metrics class (which reads the pool's counters at scrape time, and so sits above).

`observability.metrics.GatewayMetrics` is the one implementation.
"""

from __future__ import annotations

from typing import Protocol


class UpstreamMetrics(Protocol):
    streams_open: int     # event streams being relayed now
    stream_lines: int     # event-stream lines relayed
    stream_bytes: int     # event-stream bytes relayed

    def upstream(self, template: str, status: int, seconds: float) -> None:
        """The coordinator answered `status` on `template` after `seconds` (until its headers)."""

    def upstream_failed(self, kind: str) -> None:
        """An exchange failed before or while answering: connect, timeout, reset, protocol."""

    def retried(self, template: str) -> None:
        """An exchange on `template` is tried again."""
