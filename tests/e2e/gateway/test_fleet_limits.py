"""Fleet-wide run-start limits through a real Redis (issue 20).

Two gateway processes with two workers each behind one redis-server hold one subject to one limit;
with `backend: local` the same load shows the limit multiplied by the processes. Redis paused,
killed and restarted, behind a password or with a wrong one: every answer still comes in
`redis.timeout_ms` plus a little, with the configured fallback, and the limit is shared again once
Redis is back. `key: tenant` counts a tenant's members together. The RateLimit fields agree with
Retry-After. Redis is Debian's `redis-server` on a free loopback port (tests/support/redis.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings.config import ConfigError, build_config
from tests.support.gateway import RUN_START
from tests.support.process import ROOT, free_port, serve_process
from tests.support.rawhttp import RawConnection, Response, request
from tests.support.redis import RedisServer, needs_redis

pytestmark = needs_redis

BODY = json.dumps(RUN_START).encode()
AUD = "arp-run-gateway"
POLICY = re.compile(r'^"run-start";q=(\d+);w=(\d+)$')
STATE = re.compile(r'^"run-start";r=(\d+);t=(\d+)$')


async def run_start(conn: RawConnection, token: str | None = None) -> Response:
    headers = [("Content-Type", "application/json")] + ([("Authorization", f"Bearer {token}")] if token else [])
    await conn.send(request("POST", "/v1/runs", headers, BODY))
    answer = await conn.response(method="POST")
    assert answer is not None
    return answer


async def get(url: str, target: str) -> Response:
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", target))
        answer = await conn.response()
        assert answer is not None
        return answer


def metric(exposition: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", exposition, re.M)
    return float(found.group(1)) if found else 0.0


async def scrape(url: str) -> str:
    return (await get(url, "/metrics")).body.decode()


def evalsha_calls(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def auth_with(issuer: Any) -> dict[str, Any]:
    return {"mode": "required", "issuers": [{"issuer": issuer.url, "audiences": [AUD]}]}


# --------------------------------------------------------------------------- the fleet


async def drive(urls: list[str], hammer_token: str, steady_token: str, seconds: float,
                steady_rate: float) -> tuple[int, float, int, float]:
    """Eight clients hammer run starts for one subject over both gateways while one client sends
    another subject's run starts at `steady_rate`; (hammer accepted, its elapsed, steady accepted,
    its elapsed). Bounded by `seconds` and by a count per client."""
    accepted = {"hammer": 0, "steady": 0}
    spans: dict[str, list[float]] = {"hammer": [], "steady": []}
    end = time.monotonic() + seconds

    async def hammer(url: str) -> None:
        async with await RawConnection.open(url) as conn:
            for _ in range(2000):
                if time.monotonic() >= end:
                    return
                spans["hammer"].append(time.monotonic())
                answer = await run_start(conn, hammer_token)
                assert answer.status in (200, 429), answer.describe()
                accepted["hammer"] += answer.status == 200
                await asyncio.sleep(0.02)  # paces the hammer: the cores are shared

    async def steady() -> None:
        conns = [await RawConnection.open(url) for url in urls]
        try:
            start = time.monotonic()
            for i in range(int(seconds * steady_rate)):
                await asyncio.sleep(max(0.0, start + i / steady_rate - time.monotonic()))
                spans["steady"].append(time.monotonic())
                answer = await run_start(conns[i % len(conns)], steady_token)
                assert answer.status in (200, 429), answer.describe()
                accepted["steady"] += answer.status == 200
        finally:
            for conn in conns:
                await conn.close()

    await asyncio.gather(steady(), *(hammer(urls[i % len(urls)]) for i in range(8)))
    return (accepted["hammer"], spans["hammer"][-1] - spans["hammer"][0],
            accepted["steady"], spans["steady"][-1] - spans["steady"][0])


def fleet_config(path: Path, port: int, upstream: str, issuer: Any, rate: dict[str, Any],
                 redis_url: str | None) -> Path:
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port, "workers": 2},
        "upstream": {"url": upstream},
        "auth": auth_with(issuer),
        "metrics": {"enabled": False},
        "logging": {"access_log": False},
        "limits": {"run_start_rate": rate},
        "drain_delay_s": 0,
        "shutdown_grace_s": 1,
    }
    if redis_url:
        raw["redis"] = {"url": redis_url, "timeout_ms": 200}
    path.write_text(yaml.safe_dump(raw))
    return path


async def both_workers_started(served: Any) -> None:
    async with asyncio.timeout(20):
        while sum(1 for _, e in served.logs if e.get("event") == "start") < 2:
            await asyncio.sleep(0.05)  # the second worker process starting


@pytest.mark.parametrize("backend", ["redis", "local"])
async def test_two_gateways_of_two_workers_hold_one_subject_to_one_limit(backend, redis_server, recorder, issuer,
                                                                       tmp_path):
    per_second, burst = 4.0, 5
    rate = {"per_second": per_second, "burst": burst, "backend": backend}
    configs = [fleet_config(tmp_path / f"gw{i}.yaml", free_port(), recorder.url, issuer, rate,
                            redis_server.url if backend == "redis" else None) for i in range(2)]
    async with serve_process(configs[0]) as one, serve_process(configs[1]) as two:
        await both_workers_started(one)
        await both_workers_started(two)
        hammered, elapsed, steady, steady_elapsed = await drive(
            [one.url, two.url], issuer.mint(sub="hammer", aud=AUD), issuer.mint(sub="steady", aud=AUD),
            seconds=5 if backend == "redis" else 3, steady_rate=2 * per_second)
    bound = burst + per_second * elapsed + 1
    if backend == "redis":
        assert hammered <= bound, (hammered, elapsed)
        assert hammered >= burst + per_second * elapsed - 2  # and the limit is what was given, not less
        steady_rate = (steady - burst) / steady_elapsed
        assert abs(steady_rate - per_second) <= 0.1 * per_second, (steady, steady_elapsed)
    else:
        # Why backend: redis exists: each of the four processes keeps its own buckets.
        assert hammered > 1.5 * bound, (hammered, elapsed)


# --------------------------------------------------------------------------- Redis failing


def redis_rate(**rate: Any) -> dict[str, Any]:
    return {"run_start_rate": {"per_second": 2, "burst": 5, "backend": "redis", **rate}}


async def test_a_paused_redis_costs_at_most_the_timeout_then_the_breaker_answers_at_once(
        gateway, redis_server, recorder):
    url = await gateway(recorder.url, limits=redis_rate(),
                        redis={"url": redis_server.url, "timeout_ms": 50, "breaker_failures": 3,
                               "breaker_open_s": 0.5},
                        metrics={"enabled": True, "port": 0})
    async with await RawConnection.open(url) as conn:
        assert (await run_start(conn)).status == 200
        assert metric(await scrape(url), "arp_gateway_rate_limit_decisions_total",
                      '{backend="redis",decision="allowed"}') == 1
        redis_server.pause()
        try:
            waits = []
            for _ in range(6):
                started = time.monotonic()
                answer = await run_start(conn)
                waits.append(time.monotonic() - started)
                assert answer.status in (200, 429), answer.describe()   # the local fallback decided
            exposition = await scrape(url)
        finally:
            redis_server.resume()
        # timeout_ms plus the request itself; the margin absorbs a loaded CI core,
        # and is still far below what waiting on a stopped Redis would take.
        assert max(waits) < 0.05 + 0.40, waits
        assert metric(exposition, "arp_gateway_redis_errors_total", '{kind="timeout"}') == 3  # then the breaker
        assert metric(exposition, "arp_gateway_redis_up") == 0
        assert metric(exposition, "arp_gateway_rate_limit_decisions_total", '{backend="local",decision="allowed"}') \
            + metric(exposition, "arp_gateway_rate_limit_decisions_total", '{backend="local",decision="limited"}') == 6
        await asyncio.sleep(0.6)                                # breaker_open_s: Redis is asked again
        await run_start(conn)
        exposition = await scrape(url)
        assert metric(exposition, "arp_gateway_redis_up") == 1
        assert metric(exposition, "arp_gateway_rate_limit_decisions_total",
                      '{backend="redis",decision="allowed"}') \
            + metric(exposition, "arp_gateway_rate_limit_decisions_total", '{backend="redis",decision="limited"}') == 2


async def test_redis_killed_and_restarted_the_breaker_opens_closes_and_the_limit_is_shared_again(
        gateway, redis_server, recorder):
    options = {"limits": redis_rate(per_second=0.5, burst=2),
               "redis": {"url": redis_server.url, "timeout_ms": 100, "breaker_failures": 2, "breaker_open_s": 0.5},
               "metrics": {"enabled": True, "port": 0}}
    first, second = await gateway(recorder.url, **options), await gateway(recorder.url, **options)
    redis_server.kill()
    async with await RawConnection.open(first) as conn:
        statuses = [(await run_start(conn)).status for _ in range(6)]
    assert statuses[:2] == [200, 200] and 429 in statuses   # the fallback still limits this process
    exposition = await scrape(first)
    assert metric(exposition, "arp_gateway_redis_errors_total", '{kind="connection"}') == 2  # then open
    redis_server.start()
    await asyncio.sleep(0.6)
    # Shared again: the two gateways take from one bucket of 2.
    async with await RawConnection.open(first) as a, await RawConnection.open(second) as b:
        statuses = [(await run_start(a)).status, (await run_start(b)).status, (await run_start(b)).status]
    assert statuses == [200, 200, 429]
    assert metric(await scrape(second), "arp_gateway_redis_up") == 1
    assert len(redis_server.client().keys("arpgw:run_start:*")) == 1


@pytest.mark.parametrize("on_error, status", [("open", 200), ("closed", 503)])
async def test_an_unreachable_redis_at_start_is_no_crash_and_readiness_does_not_wait_for_it(
        gateway, recorder, on_error, status):
    url = await gateway(recorder.url, limits=redis_rate(on_backend_error=on_error),
                        redis={"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 50})
    assert (await get(url, "/readyz")).status == 200
    async with await RawConnection.open(url) as conn:
        answer = await run_start(conn)
    assert answer.status == status, answer.describe()
    if status == 503:
        envelope = answer.envelope()
        assert envelope is not None
        assert envelope["code"] == "rate_limiter_unavailable" and envelope["retryable"] is True
        assert int(answer.header("Retry-After") or 0) >= 1
        assert not recorder.requests                            # never forwarded
    else:
        assert len(recorder.requests) == 1


async def test_a_redis_with_requirepass_and_the_password_file_and_a_wrong_password(gateway, recorder, tmp_path):
    secret = "pw-for-the-test-only"
    with RedisServer(tmp_path, password=secret) as server:
        (tmp_path / "right").write_text(secret + "\n")
        (tmp_path / "wrong").write_text("not-it\n")
        results = {}
        for name in ("right", "wrong"):
            url = await gateway(recorder.url, limits=redis_rate(burst=1, on_backend_error="closed"),
                                redis={"url": server.url, "password_file": str(tmp_path / name), "timeout_ms": 200},
                                metrics={"enabled": True, "port": 0})
            async with await RawConnection.open(url) as conn:
                results[name] = [(await run_start(conn)).status for _ in range(2)]
            exposition = await scrape(url)
            results[name + "_auth_errors"] = metric(exposition, "arp_gateway_redis_errors_total", '{kind="auth"}')
    assert results["right"] == [200, 429] and results["right_auth_errors"] == 0
    assert results["wrong"] == [503, 503] and results["wrong_auth_errors"] >= 1


# --------------------------------------------------------------------------- keys and headers


@pytest.mark.parametrize("named_in", ["limit", "runs"])
async def test_key_tenant_limits_a_tenants_members_together(gateway, redis_server, recorder, issuer, named_in):
    """The tenant claim is the limit's own, or else the one runs bind into each run (runs.tenant_claim)."""
    sections: dict[str, Any] = {"limits": redis_rate(burst=2, key="tenant", tenant_claim="tenant_id")} \
        if named_in == "limit" else {"limits": redis_rate(burst=2, key="tenant"), "runs": {"tenant_claim": "tenant_id"}}
    url = await gateway(recorder.url, auth=auth_with(issuer), redis={"url": redis_server.url}, **sections)
    alice = issuer.mint(sub="alice", aud=AUD, extra={"tenant_id": "acme"})
    bob = issuer.mint(sub="bob", aud=AUD, extra={"tenant_id": "acme"})
    carol = issuer.mint(sub="carol", aud=AUD, extra={"tenant_id": "globex"})
    async with await RawConnection.open(url) as conn:
        assert [(await run_start(conn, t)).status for t in (alice, bob, bob, carol)] == [200, 200, 429, 200]


async def test_the_ratelimit_fields_are_well_formed_and_agree_with_retry_after(gateway, redis_server, recorder):
    url = await gateway(recorder.url, limits=redis_rate(per_second=1, burst=3), redis={"url": redis_server.url})
    async with await RawConnection.open(url) as conn:
        answers = [await run_start(conn) for _ in range(4)]
    assert [a.status for a in answers] == [200, 200, 200, 429]
    for answer in answers:
        assert POLICY.match(answer.header("RateLimit-Policy") or "").groups() == ("3", "3")
    states = [STATE.match(a.header("RateLimit") or "") for a in answers]
    assert all(states), [a.header("RateLimit") for a in answers]
    assert [int(s.group(1)) for s in states if s] == [2, 1, 0, 0]
    refused = answers[3]
    retry_after = refused.header("Retry-After")
    assert states[3] is not None and states[3].group(2) == retry_after == "1"
    assert refused.envelope()["details"]["retry_after_s"] == 1  # type: ignore[index]


async def test_requests_that_are_not_run_starts_never_touch_redis(gateway, redis_server, recorder):
    url = await gateway(recorder.url, limits=redis_rate(), redis={"url": redis_server.url})
    before = evalsha_calls(redis_server)
    for target in ("/v1/runs/r1", "/v1/runs/r1/events", "/v1/health", "/readyz"):
        await get(url, target)
    assert evalsha_calls(redis_server) == before
    async with await RawConnection.open(url) as conn:
        await run_start(conn)
    assert evalsha_calls(redis_server) == before + 1


# --------------------------------------------------------------------------- configuration


def test_check_config_reports_a_missing_password_file(tmp_path):
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({"auth": {"mode": "disabled"},
                                      "redis": {"url": "redis://127.0.0.1:6379/0",
                                                "password_file": str(tmp_path / "absent")}}))
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert re.search(r"^config error: redis\.password_file: cannot read .*absent", done.stderr, re.M)
    with pytest.raises(ConfigError, match=r"redis\.url: limits\.run_start_rate\.backend is 'redis'"):
        build_config({"auth": {"mode": "disabled"}, "limits": redis_rate()})
