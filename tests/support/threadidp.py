"""The IdP of the `idp` fixture: one MockIdp (oauth2-mock-server) in its own loop thread for the run.

pytest-asyncio gives each test its own loop and a MockIdp belongs to the loop that
started it, while starting node per test is slow; so the shared IdP lives in a
LoopThread and tests await it from their own loop:

    token = await idp.token({"sub": "alice", "aud": "x"})

It only mints tokens and reads keys: a test that rotates keys or takes the IdP down
uses `fresh_idp`, a MockIdp of its own, so it cannot disturb other tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.support.idp import MockIdp
from tests.support.loopthread import LoopThread

T = TypeVar("T")


class ThreadIdp:
    def __init__(self) -> None:
        self._thread = LoopThread()
        try:
            self._idp: MockIdp = self._thread.run(MockIdp.start())
        except BaseException:
            self._thread.close()
            raise

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._thread.loop))

    @property
    def issuer(self) -> str:
        return self._idp.issuer

    @property
    def kid(self) -> str:
        return self._idp.kid

    async def token(self, claims: dict[str, Any] | None = None, ttl: float = 300, **kw: Any) -> str:
        return await self._call(self._idp.token(claims, ttl, **kw))

    async def jwks(self) -> dict[str, Any]:
        return await self._call(self._idp.jwks())

    def close(self) -> None:
        try:
            self._thread.run(self._idp.close())
        finally:
            self._thread.close()
