"""What reading a request body or writing an answer can end in, for the stages that wait on either."""

from __future__ import annotations


class ClientGone(Exception):
    """The client closed its connection."""


class BodyTooLarge(Exception):
    """The body grew past limits.max_body_bytes."""


class BodyTimeout(Exception):
    """The body did not arrive within limits.body_timeout_s."""


class BodyIncomplete(Exception):
    """The body ended before its end: the client closed its side (`incomplete_body`), or its framing
    broke (`bad_framing`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrailerTooLarge(BodyIncomplete):
    """The chunked body's trailer section grew past limits.max_header_bytes or max_headers."""

    def __init__(self) -> None:
        super().__init__("trailer_too_large")


class Overloaded(Exception):
    """limits.max_buffered_bytes stayed full until limits.body_timeout_s passed: the body could not be read."""
