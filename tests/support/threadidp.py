"""A MockIdp in its own loop thread, so one node process serves every test of a module.

pytest-asyncio gives each test its own loop and a MockIdp belongs to the loop that
started it; starting node per test costs ~0.5 s. (The same pattern as the private
helper of test_auth_gateway.py, which test modules must not import.)

    @pytest.fixture(scope="module")
    def idp():
        shared = ThreadIdp()
        yield shared
        shared.close()

    token = await idp.token({"sub": "alice", "aud": "x"})
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tests.support.idp import MockIdp


class ThreadIdp:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge-idp-loop", daemon=True)
        self._thread.start()
        self._idp: MockIdp = self._blocking(MockIdp.start())

    def _blocking(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    async def _call(self, coro: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

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
            self._blocking(self._idp.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
