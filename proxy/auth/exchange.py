"""Tokens for the coordinator: RFC 8693 token exchange, or client credentials when no caller token exists.

Results are cached until shortly before they expire and fetched single-flight,
so a burst of requests from one caller costs the STS one exchange. A failure is
logged as one warning (the STS's status and OAuth `error`/`error_description`,
cut short and with the tokens and client secret cut out) at most every
FAILURE_LOG_INTERVAL_S, counting the ones it stood for: the client only sees
502 token_exchange_failed, and an STS refusing every caller must not flood the log.

    exchanger = TokenExchanger(cfg.auth.exchange, clock)
    exchanger.start(session)
    token = await exchanger.token_for(principal.token)    # None: client credentials
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient

from ..settings.config import ExchangeConfig
from ..util.boundedcache import BoundedCache
from ..util.clock import Clock
from ..util.secretfile import SecretFile
from ..util.singleflight import SingleFlight

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
EXPIRY_MARGIN_S = 30.0
DEFAULT_LIFETIME_S = 60.0
CACHE_SIZE = 10000
FAILURE_LOG_INTERVAL_S = 10.0
OAUTH_TEXT_CHARS = 200           # of the STS's error and error_description, in the warning
MAX_ERROR_BODY = 16384           # of an STS error answer read to find them
# A JWS/JWT anywhere in the STS's words: whoever's token it echoes, it stays out of the log.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")

log = logging.getLogger("proxy.auth.exchange")


class ExchangeFailed(Exception):
    """The STS did not give us a token; `reason` is safe to show, never the STS's raw body.
    `status`, `error` and `description` are for the operator's log only (None when unknown)."""

    def __init__(self, reason: str, *, retryable: bool, status: int | None = None, error: object = None,
                 description: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.error = error
        self.description = description


class TokenExchanger:
    def __init__(self, cfg: ExchangeConfig, clock: Clock) -> None:
        self._cfg = cfg
        self._clock = clock
        self._client: RetryClient | None = None
        # Keyed by the subject token's SHA-256 (b"" for client credentials): no caller's token is kept.
        self._cache: BoundedCache[bytes, tuple[str, float]] = BoundedCache(CACHE_SIZE)
        self._flight: SingleFlight[bytes, tuple[str, float]] = SingleFlight()
        self._quiet_until = -math.inf   # no failure warning before this (monotonic)
        self._suppressed = 0
        self._secret = (SecretFile(cfg.client_secret_file, "auth.exchange.client_secret_file", clock,
                                   initial=cfg.client_secret) if cfg.client_secret_file else None)

    def start(self, session: aiohttp.ClientSession) -> None:
        retry = ExponentialRetry(attempts=3, start_timeout=0.1, max_timeout=1.0,
                                 exceptions={aiohttp.ClientConnectorError}, retry_all_server_errors=True)
        self._client = RetryClient(client_session=session, retry_options=retry, raise_for_status=False)

    async def token_for(self, subject_token: str | None) -> str:
        key = hashlib.sha256(subject_token.encode()).digest() if subject_token else b""
        hit = self._cache.get(key)
        if hit is not None and hit[1] > self._clock.monotonic():
            return hit[0]
        token, _ = await self._flight.do(key, lambda: self._fetch_and_keep(key, subject_token))
        return token

    async def _fetch_and_keep(self, key: bytes, subject_token: str | None) -> tuple[str, float]:
        try:
            result = await self._fetch(subject_token)
        except ExchangeFailed as exc:
            self._report(exc, subject_token)
            raise
        self._cache.put(key, result)  # failures are not kept: the next request asks again
        return result

    async def _fetch(self, subject_token: str | None) -> tuple[str, float]:
        cfg = self._cfg
        secret = self._client_secret()
        form = {"audience": cfg.audience, "client_id": cfg.client_id or "", "client_secret": secret or ""}
        if subject_token:
            form.update(grant_type=TOKEN_EXCHANGE, subject_token=subject_token,
                        subject_token_type=ACCESS_TOKEN_TYPE, requested_token_type=ACCESS_TOKEN_TYPE)
        else:
            form["grant_type"] = "client_credentials"
        if cfg.scope:
            form["scope"] = cfg.scope
        assert self._client is not None and cfg.token_endpoint is not None
        try:
            async with self._client.post(cfg.token_endpoint, data=form) as resp:
                status = resp.status
                body = await resp.json(content_type=None) if status == 200 else await _error_body(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise ExchangeFailed(f"token endpoint unreachable: {type(exc).__name__}", retryable=True) from None
        if status != 200:
            raise ExchangeFailed(f"token endpoint answered HTTP {status}", retryable=status >= 500 or status == 429,
                                 status=status, error=body.get("error"), description=body.get("error_description"))
        if not isinstance(body, dict):
            raise ExchangeFailed("token endpoint answered without an access_token", retryable=False, status=status)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ExchangeFailed("token endpoint answered without an access_token", retryable=False, status=status)
        lifetime = body.get("expires_in", DEFAULT_LIFETIME_S)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not math.isfinite(lifetime):
            lifetime = DEFAULT_LIFETIME_S
        # Renew shortly before expiry; a short-lived token keeps half its life so it is still cached.
        margin = min(EXPIRY_MARGIN_S, float(lifetime) / 2)
        return token, self._clock.monotonic() + max(0.0, float(lifetime) - margin)

    def _client_secret(self) -> str | None:
        return self._secret.value() if self._secret is not None else self._cfg.client_secret

    def _report(self, exc: ExchangeFailed, subject_token: str | None) -> None:
        now = self._clock.monotonic()
        if now < self._quiet_until:
            self._suppressed += 1
            return
        self._quiet_until = now + FAILURE_LOG_INTERVAL_S
        # The secret in use now: a rotated file's new content is what an STS would echo back.
        secrets = [s for s in (subject_token, self._cfg.client_secret, self._client_secret()) if s]
        log.warning("token exchange failed", extra={
            "event": "token_exchange_failed", "reason": exc.reason, "status": exc.status,
            "error": _shown(exc.error, secrets), "error_description": _shown(exc.description, secrets),
            "suppressed": self._suppressed})
        self._suppressed = 0


async def _error_body(resp: aiohttp.ClientResponse) -> dict:
    """An STS error answer's JSON object (RFC 6749 5.2), read up to MAX_ERROR_BODY; {} when it is none."""
    data = b""
    while len(data) < MAX_ERROR_BODY:
        chunk = await resp.content.read(MAX_ERROR_BODY - len(data))
        if not chunk:
            break
        data += chunk
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def _shown(value: object, secrets: list[str]) -> str | None:
    """STS text as the log may hold it: a string, without any secret or token, cut short."""
    if not isinstance(value, str):
        return None
    for secret in secrets:
        value = value.replace(secret, "[redacted]")
    return _JWT.sub("[token]", value)[:OAUTH_TEXT_CHARS]
