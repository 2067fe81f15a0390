"""The run-start limit shared by the whole fleet through Redis, and what happens when Redis fails.

With `limits.run_start_rate.backend: local` every worker process of every replica keeps its own
buckets, so a caller really gets workers x replicas times the limit. With `backend: redis` each
principal has one key in Redis holding its GCRA TAT (ratelimit.py), read and moved by one Lua
script, so every process of every replica decides from the same state. The script reads the time
from Redis (`TIME`), so replica clocks do not matter, sets an expiry equal to the time the key
needs to be full again (an idle key vanishes exactly when forgetting it changes nothing), and
names the key with a hash tag (`{...}`) so it maps to one slot on Redis Cluster.

Redis failing is the normal case to design for. A decision gets `redis.timeout_ms` in all
(waiting for a pooled connection included); after that, or on any error, `on_backend_error`
decides: `local` (this process's own bucket), `open` (allow) or `closed` (503
rate_limiter_unavailable). After `redis.breaker_failures` failures in a row the breaker stops
asking Redis for `redis.breaker_open_s`, so an outage costs latency only for the first few
requests; then one request probes, and a success closes the breaker. While Redis is down one
warning is logged at most every DOWN_WARN_EVERY_S, and one info line when it is back. Readiness
never depends on Redis: a gateway whose Redis is down still serves with its fallback.

The module sits in `gateway/`: the one user is the admit stage's limiter, and the fallback it
needs is the gateway's local limiter. A future feature below the gateway that needs fleet state
would move `RedisStore` to a package of its own under the gateway in the layering.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError, AuthorizationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..settings.models import BackendError, RedisConfig
from ..util.boundedcache import BoundedCache
from ..util.clock import Clock
from ..util.secretfile import SecretFile
from .ratelimit import Policy, RateLimiter

log = logging.getLogger("proxy.gateway.redislimit")

DOWN_WARN_EVERY_S = 10.0
COMMANDS_KEPT = 4096  # packed commands kept, one per recent principal
ERROR_KINDS = ("timeout", "connection", "auth", "response")

# GCRA, as `ratelimit.gcra` computes it, in µs. KEYS[1]: the principal's key. ARGV: interval, capacity,
# and, in tests only, the time in µs (so a test can drive Redis through exactly the local limiter's
# sequence); the gateway never passes it, and Redis's own clock is used. Returns {allowed, µs}: the
# time until the key is full again when allowed, the wait until a request would pass when refused.
# The TAT is written with %.0f: Lua's tostring keeps 14 digits, a µs timestamp has 16.
GCRA_SCRIPT = """
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now
if ARGV[3] then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local over = new_tat - now - capacity
if over > 0 then
  return {0, over}
end
local ahead = new_tat - now
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000))
return {1, ahead}
"""


class Unavailable(Exception):
    """Redis could not decide: failed, too slow, or the breaker is open."""


class _PasswordFile(CredentialProvider):
    """The password, read from its file for each new connection: a rotated Secret needs no restart."""

    def __init__(self, secret: SecretFile) -> None:
        self._secret = secret

    def get_credentials(self) -> tuple[str]:
        return (self._secret.value(),)

    async def get_credentials_async(self) -> tuple[str]:
        return self.get_credentials()


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        return "timeout"
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return "auth"
    if isinstance(exc, ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return "auth"
    if isinstance(exc, (RedisConnectionError, OSError)):
        return "connection"
    return "response"


class RedisStore:
    """One process's connection pool to Redis, with its breaker, health and error counts."""

    def __init__(self, cfg: RedisConfig, clock: Clock, errors: dict[str, int] | None = None) -> None:
        assert cfg.url is not None
        self.cfg = cfg
        self._clock = clock
        self.timeout_s = cfg.timeout_ms / 1000
        self.prefix = cfg.key_prefix
        self.errors = errors if errors is not None else {}
        for kind in ERROR_KINDS:
            self.errors.setdefault(kind, 0)
        self.up = False
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._warned_at: float | None = None
        self._down = False
        credentials = None
        if cfg.password_file is not None:
            credentials = _PasswordFile(SecretFile(cfg.password_file, "redis.password_file", clock))
        # No retries inside redis-py: the breaker and on_backend_error are the retry policy, and a
        # retry could not fit in timeout_ms anyway. Every call is made inside one deadline (`run`:
        # timeout_ms), which covers waiting for a pooled connection, connecting, writing and
        # reading; the pool's and the socket's own timeouts would arm two more timers per decision
        # and a task per write (asyncio.wait_for's). Connecting, which is rare, keeps its own.
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.url, max_connections=cfg.max_connections, timeout=None,
            socket_timeout=None, socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0), credential_provider=credentials)
        self.pool = pool
        # One connection kept out of the pool between decisions: a decision that finds it skips the
        # pool's get and release (a condition, a lock and their observability hooks each way).
        # Concurrent decisions take the pool's other connections as before; the kept one counts
        # against max_connections like any other.
        self._spare: Any = None
        self._waiting = 0  # decisions waiting in pool.get_connection, which a finished one serves
        # The packed EVALSHA of the principals seen lately: the same principal's next decision
        # sends the same bytes, and packing them (encoding each argument) is work redis-py would
        # otherwise do for every run start.
        self._commands: BoundedCache[tuple[str, tuple[Any, ...]], tuple[str, Any]] = BoundedCache(COMMANDS_KEPT)
        self._commands_get = self._commands.getter(touch=True)
        self.client = aioredis.Redis(connection_pool=pool)
        self.script = self.client.register_script(GCRA_SCRIPT)

    async def start(self) -> None:
        """Connects and PINGs; a Redis that is down or refuses the password is a warning, not a failure."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                await self.client.ping()
                await self.client.script_load(GCRA_SCRIPT)
        except Exception as exc:  # noqa: BLE001 - any failure at start means "use the fallback"
            self.failed(exc)
            return
        self.succeeded()
        log.info("redis connected", extra={"event": "redis_connected", "url": self._where()})

    async def close(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            await self.pool.release(spare)
        await self.client.aclose()

    def asking(self) -> bool:
        """Whether to ask Redis now: always while the breaker is closed; when it is open, once
        breaker_open_s has passed, one caller probes while the others keep the fallback."""
        if self._failures < self.cfg.breaker_failures:
            return True
        if self._probing or self._clock.monotonic() < self._open_until:
            return False
        self._probing = True
        return True

    def reopens_in_s(self) -> float:
        return max(0.0, self._open_until - self._clock.monotonic())

    async def run(self, key: str, args: tuple[Any, ...]) -> Any:
        """The script on one key, within timeout_ms; Unavailable on any failure (counted and logged)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self._evalsha(key, args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
            raise Unavailable(error_kind(exc)) from None
        except asyncio.CancelledError:
            self._probing = False  # the caller left: a later one probes instead
            raise
        self.succeeded()
        return result

    async def _evalsha(self, key: str, args: tuple[Any, ...]) -> Any:
        """EVALSHA on a connection, and SCRIPT LOAD first when Redis answers NOSCRIPT (a flushed or
        failed-over Redis). The script's Script object keeps its text and SHA1; the command goes
        straight to the connection rather than through Redis.execute_command and Script.__call__,
        whose per-call work (command lookups, the retry wrapper, observability hooks, imports
        inside the call) was most of what a decision cost the gateway. A connection that fails or
        is cancelled mid-command is closed by redis-py, and goes back to the pool, which opens it
        again on its next use."""
        pool = self.pool
        conn = self._spare
        if conn is None:
            self._waiting += 1
            try:
                conn = await pool.get_connection()
            finally:
                self._waiting -= 1
            checked = True
        else:
            self._spare = None
            checked = False
        kept = False
        try:
            if not checked:
                await pool.ensure_connection(conn)  # what the pool's get checks: reopens a closed one
            script = self.script
            packed = self._commands_get((key, args))
            if packed is not None and packed[0] == script.sha:
                command = packed[1]
            else:
                command = conn.pack_command("EVALSHA", script.sha, 1, key, *args)
                self._commands.put((key, args), (script.sha, command))
            try:
                await conn.send_packed_command(command, check_health=False)
                result = await conn.read_response()
            except NoScriptError:
                await conn.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                await conn.read_response()
                await conn.send_packed_command(command, check_health=False)
                result = await conn.read_response()
            # Kept only after a whole answer, and only when no decision waits in the pool: a waiter
            # there gets this connection now, not at its deadline.
            if self._spare is None and not self._waiting:
                self._spare, kept = conn, True
            return result
        finally:
            if not kept:
                await pool.release(conn)

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False
        self.up = True
        if self._down:
            self._down = False
            self._warned_at = None
            log.info("redis is back; run-start limits are shared again",
                     extra={"event": "redis_up", "url": self._where()})

    def failed(self, exc: BaseException) -> None:
        kind = error_kind(exc)
        self.errors[kind] += 1
        self._failures += 1
        self._probing = False
        self.up = False
        self._down = True
        now = self._clock.monotonic()
        if self._failures >= self.cfg.breaker_failures:
            self._open_until = now + self.cfg.breaker_open_s
        if self._warned_at is None or now - self._warned_at >= DOWN_WARN_EVERY_S:
            self._warned_at = now
            # The error's text, never the password: redis-py's messages name the address and the cause.
            log.warning("redis unavailable; run-start limits use the fallback",
                        extra={"event": "redis_down", "kind": kind, "url": self._where(),
                               "error": str(exc)[:200] or type(exc).__name__,
                               "consecutive_failures": self._failures})

    def _where(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class SharedRateLimiter:
    """The run-start limit in Redis, with `on_backend_error` when Redis cannot decide."""

    def __init__(self, store: RedisStore, local: RateLimiter, on_error: BackendError, name: str = "run_start") -> None:
        self.store = store
        self.local = local
        self.policy: Policy = local.policy
        self.on_error = on_error
        self._args = (self.policy.interval, self.policy.capacity)
        self._prefix = f"{store.prefix}:{name}:"

    def redis_key(self, key: str) -> str:
        """A digest of the principal, never its subject in clear, inside a hash tag (one Cluster slot)."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return self._prefix + "{" + digest + "}"

    async def decide(self, key: str) -> tuple[str, bool, int]:
        """(who decided: "redis" or "local", allowed, µs as RateLimiter.decide gives them).
        Unavailable when Redis cannot decide and on_backend_error is open or closed."""
        store = self.store
        if store.asking():
            try:
                allowed, ahead = await store.run(self.redis_key(key), self._args)
                return "redis", bool(allowed), int(ahead)
            except Unavailable:
                pass
            except (TypeError, ValueError) as exc:  # not the script's reply: whatever answered is not trusted
                store.failed(exc)
        if self.on_error == BackendError.LOCAL:
            allowed, ahead = self.local.decide(key)
            return "local", allowed, ahead
        raise Unavailable("fallback")
