"""Logs and metrics an operator can act on (issue 16), over real sockets on 127.0.0.1.

The access line names the client, its user agent, the configured issuer and the run; it says
`upstream_ms: null` when the coordinator never answered; refusals are counted under the
configured issuer the token names; a refused token exchange leaves one warning, not a flood;
and only a trusted proxy may say who the client is.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from contextlib import redirect_stdout
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.settings.config import ConfigError
from proxy.dev import issuer as devissuer
from proxy.observability.logs import JsonFormatter
from proxy.runtime.server import start_gateway
from proxy.upstream.headers import MAX_FORWARDED_HOPS, TrustedProxies
from tests.support.gateway import RUN_START, gateway_config, json_response
from tests.support.rawhttp import RawConnection, request
from tests.support.servers import RawServer, serve_app

AUD = devissuer.DEFAULT_AUDIENCE
SECRET = "sts-secret-4b1d-never-log-me"


def auth_with(issuer: devissuer.DevIssuer, mode: str = "required") -> dict[str, Any]:
    return {"mode": mode, "issuers": [{"issuer": issuer.url, "audiences": [AUD]}]}


class Captured:
    """A gateway whose stdout (the access log) is captured; lines parsed once it has stopped."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.runner: Any = None

    async def start(self, upstream: str | None, /, **sections: Any) -> str:
        with redirect_stdout(self.out):  # the access log binds sys.stdout when the gateway is built
            self.runner, url = await start_gateway(gateway_config(upstream, **sections))
        return url

    async def stop(self) -> list[dict[str, Any]]:
        await self.runner.cleanup()  # flushes the access log
        lines = self.out.getvalue().splitlines()
        parsed = [json.loads(line) for line in lines]  # every line one JSON object, or this fails
        assert all(isinstance(entry, dict) for entry in parsed)
        return [entry for entry in parsed if entry.get("type") == "access"]


# --------------------------------------------------------------------------- access-log fields


async def test_access_lines_name_client_user_agent_issuer_and_run_id(coordinator, issuer, http) -> None:
    gw = Captured()
    url = await gw.start(coordinator, auth=auth_with(issuer))
    token = issuer.mint(sub="alice")
    expired = issuer.mint(sub="alice", ttl=-3600)
    foreign = issuer.mint(sub="mallory", extra={"iss": "https://evil.example/\"}"})
    agent = {"User-Agent": "arp-cli/1.2 (ops)"}
    async with http.post(url + "/v1/runs", json=RUN_START,
                         headers={"Authorization": f"Bearer {token}", **agent}) as resp:
        assert resp.status == 200
        run_id = (await resp.json())["run_id"]
    async with http.get(f"{url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {token}", **agent}) as resp:
        assert resp.status == 200
    async with http.post(f"{url}/v1/runs/{run_id}:cancel", headers={"Authorization": f"Bearer {expired}",
                                                                      **agent}) as resp:
        assert resp.status == 401
    async with http.get(f"{url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {foreign}", **agent}) as resp:
        assert resp.status == 401
    async with http.post(url + "/v1/runs", json=RUN_START, headers=agent) as resp:
        assert resp.status == 401
    access = await gw.stop()

    assert [(e["status"], e["route"]) for e in access] == [
        (200, "/v1/runs"), (200, "/v1/runs/{run_id}"), (401, "/v1/runs/{run_id}:cancel"),
        (401, "/v1/runs/{run_id}"), (401, "/v1/runs")]
    assert {e["client"] for e in access} == {"127.0.0.1"}
    assert {e["user_agent"] for e in access} == {"arp-cli/1.2 (ops)"}
    assert [e["issuer"] for e in access] == [issuer.url, issuer.url, issuer.url, None, None]
    assert [e["run_id"] for e in access] == [None, run_id, run_id, run_id, None]
    assert access[2]["auth_reason"] == "expired" and access[3]["auth_reason"] == "issuer_mismatch"
    for secret in (token, expired, foreign):
        assert secret[:40] not in gw.out.getvalue()


HOSTILE_AGENTS = {
    # llhttp refuses these heads (400): the line is still one JSON object, with no user agent
    "newline": (b'x"}\n{"type":"access","status":200,"forged":"\\', False),
    "controls": (b'nul-ish \x01 and del \x7f', False),
    # accepted: logged cut to 256 characters and escaped
    "quotes": (b'quote " backslash \\ tab \t latin \xe9\xff utf-8 \xe2\x80\xa8 end', True),
    "10KB": (b"A" * 10 * 1024, True),
    "json-breakout": (b'"},"forged":true,"x":{"' + b"\\u0000" * 20, True),
}


@pytest.mark.parametrize("name", HOSTILE_AGENTS)
async def test_a_hostile_user_agent_stays_one_escaped_bounded_json_field(name) -> None:
    agent, accepted = HOSTILE_AGENTS[name]
    gw = Captured()
    url = await gw.start(None)  # no coordinator: 503 run_coordinator_missing, after every other stage
    async with await RawConnection.open(url) as conn:
        await conn.send(request("GET", "/v1/runs/run-7", host="127.0.0.1")[:-2] + b"User-Agent: " + agent
                        + b"\r\n\r\n")
        answer = await conn.response()
        assert answer is not None
    (entry,) = await gw.stop()
    assert "forged" not in entry and entry["client"] == "127.0.0.1"
    if not accepted:
        assert (answer.status, entry["status"], entry["user_agent"]) == (400, 400, None)
        return
    assert answer.status == entry["status"] == 503 and entry["run_id"] == "run-7"
    assert entry["user_agent"] == agent[:256].decode("utf-8", "replace")
    assert len(entry["user_agent"]) <= 256


# --------------------------------------------------------------------------- upstream_ms


async def test_upstream_ms_is_null_without_a_coordinator_answer_and_a_number_with_one() -> None:
    mode = {"now": "ok"}
    body = b'{"run_id":"r1"}'

    async def answer(writer: asyncio.StreamWriter) -> bool:
        if mode["now"] == "garbage":
            writer.write(b"SMTP READY\r\n\x00\x01 not http\r\n\r\n")
        elif mode["now"] == "silent":
            await asyncio.sleep(2)  # outlasts the gateway's real request timeout
            return False
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        await writer.drain()
        return True

    coordinator = RawServer(answer)
    gw = Captured()
    url = await gw.start(await coordinator.start(), upstream={"request_timeout_s": 0.3, "retries": {"attempts": 1}})
    try:
        async with aiohttp.ClientSession() as http:
            for now, status in (("ok", 200), ("garbage", 502), ("silent", 504)):
                mode["now"] = now
                async with http.post(url + "/v1/runs", json=RUN_START) as resp:
                    assert resp.status == status
        access = await gw.stop()
    finally:
        await coordinator.close()
    assert [e["status"] for e in access] == [200, 502, 504]
    ok, garbled, silent = access
    assert isinstance(ok["upstream_ms"], float) and 0 <= ok["upstream_ms"] <= ok["duration_ms"]
    assert garbled["upstream_ms"] is None
    assert silent["upstream_ms"] is None


# --------------------------------------------------------------------------- auth_decisions_total


def decisions(exposition: str) -> dict[tuple[str, str, str], float]:
    found = {}
    for family in text_string_to_metric_families(exposition):
        if family.name == "arp_gateway_auth_decisions":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    found[(labels["issuer"], labels["result"], labels["reason"])] = sample.value
    return found


async def test_refusals_are_counted_under_the_configured_issuer_the_token_names(coordinator, issuer, http) -> None:
    other_runner, other = await devissuer.start(port=0)  # a real issuer the gateway does not trust
    try:
        runner, url = await start_gateway(gateway_config(coordinator, auth=auth_with(issuer),
                                                         metrics={"enabled": True, "port": 0}))
        try:
            tokens = [issuer.mint(ttl=-3600), issuer.mint(ttl=-3600), other.mint(),
                      issuer.mint(aud="someone-else"), issuer.mint()[:-4] + "AAAA"]
            for token in tokens:
                async with http.get(url + "/v1/runs/r1", headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 401
            async with http.get(url + "/metrics") as resp:
                counted = decisions(await resp.text())
        finally:
            await runner.cleanup()
    finally:
        await other_runner.cleanup()
    assert counted[(issuer.url, "unauthenticated", "expired")] == 2
    assert counted[("none", "unauthenticated", "issuer_mismatch")] == 1
    assert counted[(issuer.url, "unauthenticated", "audience_mismatch")] == 1
    assert counted[(issuer.url, "unauthenticated", "bad_signature")] == 1
    assert not any(label[0] == other.url for label in counted)


# --------------------------------------------------------------------------- token exchange refused


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log record, as the gateway writes it in production (proxy.observability.logs.JsonFormatter)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


async def test_a_refused_token_exchange_logs_one_warning_with_the_sts_error_and_no_secret(
        idp, upstream, captured_logs, clock) -> None:
    async def ok(_: web.Request) -> web.Response:
        return json_response(200, {"run_id": "r1"})

    upstream.route("*", "/{tail:.*}", ok)
    await upstream.start()
    stdout = io.StringIO()
    auth = {"mode": "required", "issuers": [{"issuer": idp.issuer, "audiences": [AUD]}],
            "forward_token": "exchange",
            # oauth2-mock-server knows no RFC 8693 grant: it refuses with 400 invalid_grant
            "exchange": {"token_endpoint": idp.issuer + "/token", "client_id": "arp-run-gateway",
                         "client_secret": SECRET}}
    with redirect_stdout(stdout):
        runner, url = await start_gateway(gateway_config(upstream.url, auth=auth), clock=clock)
    tokens = [await idp.token({"sub": f"caller-{n}", "aud": AUD}) for n in range(4)]
    try:
        async with aiohttp.ClientSession() as http:
            for n, token in enumerate(tokens):
                if n == 3:
                    clock.advance(11)  # past the quiet interval: the next failure is logged again
                async with http.get(url + "/v1/runs/r1", headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 502
                    assert (await resp.json())["error"]["code"] == "token_exchange_failed"
    finally:
        await runner.cleanup()
    assert upstream.requests == []
    records = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    warnings = [r for r in records if r.get("event") == "token_exchange_failed"]
    assert [(w["level"], w["status"], w["error"], w["suppressed"]) for w in warnings] == [
        ("warning", 400, "invalid_grant", 0), ("warning", 400, "invalid_grant", 2)]
    everything = captured_logs.getvalue() + stdout.getvalue()
    assert SECRET not in everything
    for token in tokens:
        assert token not in everything and token.split(".")[2] not in everything


async def test_an_sts_echoing_the_secret_and_token_gets_them_cut_from_the_warning(
        issuer, upstream, captured_logs) -> None:
    async def chatty(request: web.Request) -> web.Response:
        form = await request.post()
        return web.json_response({"error": "invalid_grant", "error_description":
                                  f"client secret {form.get('client_secret')} may not exchange "
                                  f"{form.get('subject_token')}" + " padding" * 100}, status=400)

    sts = web.Application()
    sts.router.add_post("/token", chatty)
    sts_runner, sts_url = await serve_app(sts)
    await upstream.start()
    auth = {**auth_with(issuer), "forward_token": "exchange",
            "exchange": {"token_endpoint": sts_url + "/token", "client_id": "gw", "client_secret": SECRET}}
    runner, url = await start_gateway(gateway_config(upstream.url, auth=auth))
    token = issuer.mint(sub="alice")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/runs/r1", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 502
    finally:
        await runner.cleanup()
        await sts_runner.cleanup()
    (warning,) = [json.loads(line) for line in captured_logs.getvalue().splitlines()
                  if '"token_exchange_failed"' in line]
    assert warning["error"] == "invalid_grant" and warning["status"] == 400
    assert warning["error_description"].startswith("client secret [redacted] may not exchange [")
    assert len(warning["error_description"]) <= 200
    assert SECRET not in captured_logs.getvalue() and token.split(".")[2] not in captured_logs.getvalue()


# --------------------------------------------------------------------------- trusted proxies


FORWARDED = [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"),
             ("X-Forwarded-Host", "runs.example.com")]


async def send(url: str, headers: list[tuple[str, str]]) -> int:
    body = json.dumps(RUN_START).encode()
    async with await RawConnection.open(url) as conn:
        await conn.send(request("POST", "/v1/runs", [("Content-Type", "application/json"), *headers], body,
                                host="gateway.test"))
        answer = await conn.response()
        assert answer is not None
        return answer.status


def limited(issuer: devissuer.DevIssuer, trusted: list[str]) -> dict[str, Any]:
    return {"auth": auth_with(issuer, "optional"), "listen": {"trusted_proxies": trusted},
            "limits": {"run_start_rate": {"per_second": 0.001, "burst": 1}}}


async def test_a_trusted_proxy_names_the_client_proto_and_host(issuer, recorder) -> None:
    gw = Captured()
    url = await gw.start(recorder.url, **limited(issuer, ["10.0.0.0/8", "127.0.0.1/32"]))
    statuses = [
        await send(url, FORWARDED),
        await send(url, [("X-Forwarded-For", "198.51.100.4")]),                  # another client: own bucket
        await send(url, [("X-Forwarded-For", "203.0.113.9, 10.1.2.3")]),         # via a second trusted hop
        await send(url, [("X-Forwarded-For", "not-an-address, 203.0.113.9")]),   # garbage left of the client
    ]
    access = await gw.stop()
    assert statuses == [200, 200, 429, 429]     # the anonymous run-start limit keys on the forwarded client
    sent = recorder.requests[0]["headers"]
    assert sent.getall("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert sent.getall("X-Forwarded-Proto") == ["https"]
    assert sent.getall("X-Forwarded-Host") == ["runs.example.com"]
    assert [e["client"] for e in access] == ["203.0.113.9", "198.51.100.4", "203.0.113.9", "203.0.113.9"]


async def test_an_untrusted_peer_cannot_name_the_client(issuer, recorder) -> None:
    gw = Captured()
    url = await gw.start(recorder.url, **limited(issuer, ["10.0.0.0/8"]))
    statuses = [await send(url, FORWARDED), await send(url, [("X-Forwarded-For", "198.51.100.4")])]
    access = await gw.stop()
    assert statuses == [200, 429]                # both are the peer 127.0.0.1: one bucket
    sent = recorder.requests[0]["headers"]
    assert sent.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert sent.getall("X-Forwarded-Proto") == ["http"]
    assert sent.getall("X-Forwarded-Host") == ["gateway.test"]
    assert [e["client"] for e in access] == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize("value, problem", [
    (["10.0.0.1/8"], "listen.trusted_proxies[0]: not a CIDR network: '10.0.0.1/8'"),
    (["10.0.0.0/8", "ingress"], "listen.trusted_proxies[1]: not a CIDR network: 'ingress'"),
    ("10.0.0.0/33", "listen.trusted_proxies[0]: not a CIDR network: '10.0.0.0/33'"),
])
def test_a_bad_trusted_proxy_network_fails_start_up_naming_the_key(value, problem) -> None:
    with pytest.raises(ConfigError) as failed:
        gateway_config(None, listen={"trusted_proxies": value})
    (line,) = failed.value.problems
    assert line.startswith(problem)


def test_a_dual_stack_peer_and_a_long_forwarded_chain() -> None:
    trusted = TrustedProxies(gateway_config(None, listen={"trusted_proxies": "127.0.0.1, 10.0.0.0/8"})
                             .listen.trusted_proxies)
    assert trusted.trusts("::ffff:10.1.2.3") and trusted.trusts("127.0.0.1")
    assert not trusted.trusts("::1") and not trusted.trusts("11.0.0.1") and not trusted.trusts("")
    conn = SimpleNamespace(peer="10.9.9.9")
    # Past MAX_FORWARDED_HOPS trusted-looking hops the walk stops, at a trusted address, never at the
    # spoofed one on the far left.
    chain = "198.51.100.1, " + ", ".join(["10.0.0.1"] * (MAX_FORWARDED_HOPS + 5))
    far = SimpleNamespace(conn=conn, headers=[(b"X-Forwarded-For", chain.encode())])
    assert trusted.client(far) == "10.0.0.1"  # type: ignore[arg-type]
    near = SimpleNamespace(conn=conn, headers=[(b"x-forwarded-for", b"2001:DB8::1 , 10.0.0.7")])
    assert trusted.client(near) == "2001:db8::1"  # type: ignore[arg-type]
