"""`auth.forward_token: exchange`: the coordinator gets a token from an RFC 8693 STS, never the caller's.

The caller's tokens come from the dev issuer (`proxy.dev.issuer`, in this loop, so the
gateway verifies them through the production JWKS path); the STS is a purpose-built
loopback token endpoint that records every form it receives and can be told to
fail, to be slow, or to issue short-lived tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.dev import issuer as devissuer
from proxy.util.clock import FakeClock
from proxy.settings.config import ExchangeConfig, load_config
from proxy.auth.exchange import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE, ExchangeFailed, TokenExchanger
from proxy.runtime.server import start_gateway
from tests.support.process import free_port
from tests.support.servers import serve_app

AUD = devissuer.DEFAULT_AUDIENCE
CLIENT_ID = "arp-run-gateway"
SECRET = "sts-secret-7f3a9c-never-show-me"
ARP_GATEWAY = Path(sys.executable).with_name("arp-gateway")


class Sts:
    """A loopback OAuth token endpoint: token exchange and client credentials."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        self.status = 200
        self.expires_in: Any = 3600
        self.delay_s = 0.0
        self.issued = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow token endpoint, so requests overlap one exchange
        if self.status != 200:
            # A chatty STS: the gateway must not relay any of this.
            return web.json_response({"error": "invalid_grant", "error_description":
                                      f"client {form.get('client_id')} with {form.get('client_secret')} "
                                      f"for {form.get('subject_token')}"}, status=self.status)
        self.issued += 1
        kind = "xchg" if form.get("grant_type") == TOKEN_EXCHANGE else "cc"
        body = {"access_token": f"{kind}-token-{self.issued}", "token_type": "Bearer",
                "issued_token_type": ACCESS_TOKEN_TYPE}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner, self.url = await serve_app(app)

    @property
    def token_endpoint(self) -> str:
        return self.url + "/token"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def sts() -> AsyncIterator[Sts]:
    server = Sts()
    await server.start()
    yield server
    await server.close()


def exchange_auth(issuer: devissuer.DevIssuer, token_endpoint: str, **extra: Any) -> dict[str, Any]:
    exchange = {"token_endpoint": token_endpoint, "client_id": CLIENT_ID, "client_secret": SECRET}
    exchange.update(extra.pop("exchange", {}))
    return {"mode": "required", "issuers": [{"issuer": issuer.url, "audiences": [AUD]}],
            "forward_token": "exchange", "exchange": exchange, **extra}


async def get(http: aiohttp.ClientSession, url: str, token: str | None,
              path: str = "/v1/runs/run_1") -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url + path, headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


# --------------------------------------------------------------------------- exchange


async def test_coordinator_receives_the_exchanged_token(issuer, sts, gateway, recorder, http) -> None:
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint))
    inbound = issuer.mint(sub="alice")
    status, text, _ = await get(http, url, inbound)
    assert status == 200, text
    assert SECRET not in text and inbound not in text

    (form,) = sts.forms
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert form["subject_token"] == inbound
    assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert form["audience"] == "arp-run-coordinator"
    assert form["client_id"] == CLIENT_ID and form["client_secret"] == SECRET

    (seen,) = recorder.requests
    assert seen["headers"].getall("Authorization") == ["Bearer xchg-token-1"]
    assert seen["headers"]["X-Auth-Subject"] == "alice"
    assert all(inbound not in v for v in seen["headers"].values())


async def test_exchange_audience_from_config(issuer, sts, gateway, recorder, http) -> None:
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint,
                                                         exchange={"audience": "jarvis-rc-prod"}))
    assert (await get(http, url, issuer.mint()))[0] == 200
    assert sts.forms[0]["audience"] == "jarvis-rc-prod"


async def test_exchange_audience_from_jarvis_environment(issuer, sts, recorder, http, tmp_path) -> None:
    raw = {"listen": {"host": "127.0.0.1", "port": 0}, "upstream": {"url": recorder.url},
           "metrics": {"enabled": False}, "logging": {"access_log": False},
           "auth": exchange_auth(issuer, sts.token_endpoint)}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, {"JARVIS_RUN_COORDINATOR_AUDIENCE": "jarvis-coordinator-env"})
    runner, url = await start_gateway(cfg)
    try:
        assert (await get(http, url, issuer.mint()))[0] == 200
    finally:
        await runner.cleanup()
    assert sts.forms[0]["audience"] == "jarvis-coordinator-env"


async def test_exchange_is_cached_per_subject_token(issuer, sts, gateway, recorder, http) -> None:
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint))
    alice, bob = issuer.mint(sub="alice"), issuer.mint(sub="bob")
    for _ in range(3):
        assert (await get(http, url, alice))[0] == 200
    assert len(sts.forms) == 1
    assert (await get(http, url, bob))[0] == 200
    assert [f["subject_token"] for f in sts.forms] == [alice, bob]
    auths = [r["headers"]["Authorization"] for r in recorder.requests]
    assert auths == ["Bearer xchg-token-1"] * 3 + ["Bearer xchg-token-2"]


async def test_concurrent_requests_share_one_exchange(issuer, sts, gateway, recorder, http) -> None:
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint))
    sts.delay_s = 0.3  # every request arrives while the one exchange is in flight
    token = issuer.mint(sub="burst")
    results = await asyncio.gather(*(get(http, url, token) for _ in range(50)))
    assert [status for status, _, _ in results] == [200] * 50
    assert len(sts.forms) == 1
    assert len(recorder.requests) == 50
    assert {r["headers"]["Authorization"] for r in recorder.requests} == {"Bearer xchg-token-1"}


async def test_exchanged_token_is_renewed_after_expiry(issuer, sts, gateway, recorder, http, clock) -> None:
    url = await gateway(recorder.url, clock=clock, auth=exchange_auth(issuer, sts.token_endpoint))
    sts.expires_in = 2  # renewal comes after half a short lifetime: 1 s
    token = issuer.mint()
    assert (await get(http, url, token))[0] == 200
    assert (await get(http, url, token))[0] == 200
    assert len(sts.forms) == 1
    clock.advance(0.9)
    assert (await get(http, url, token))[0] == 200
    assert len(sts.forms) == 1  # still within its renewal time
    clock.advance(0.3)
    assert (await get(http, url, token))[0] == 200
    assert len(sts.forms) == 2
    assert [r["headers"]["Authorization"] for r in recorder.requests] == [
        "Bearer xchg-token-1", "Bearer xchg-token-1", "Bearer xchg-token-1", "Bearer xchg-token-2"]


async def test_optional_mode_without_token_uses_client_credentials(issuer, sts, gateway, recorder, http) -> None:
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint, mode="optional"))
    for _ in range(2):
        assert (await get(http, url, None))[0] == 200
    (form,) = sts.forms
    assert form["grant_type"] == "client_credentials"
    assert "subject_token" not in form
    assert form["client_id"] == CLIENT_ID and form["client_secret"] == SECRET
    assert form["audience"] == "arp-run-coordinator"
    for seen in recorder.requests:
        assert seen["headers"]["Authorization"] == "Bearer cc-token-1"
        assert seen["headers"]["X-Auth-Subject"] == "anonymous"


@pytest.mark.parametrize("status, retryable", [(500, True), (400, False)])
async def test_sts_error_answers_502_and_upstream_is_not_called(
        issuer, sts, gateway, recorder, http, status, retryable) -> None:
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint))
    sts.status = status
    inbound = issuer.mint()
    code, text, headers = await get(http, url, inbound)
    assert code == 502, text
    error = json.loads(text)["error"]
    assert error["code"] == "token_exchange_failed"
    assert error["retryable"] is retryable
    assert str(status) in error["details"]["reason"]
    for blob in (text, *headers.values()):
        assert SECRET not in blob and inbound not in blob and "invalid_grant" not in blob
    assert recorder.requests == []
    assert sts.forms

    # A failure is not cached: once the STS is back, the same caller gets through.
    sts.status = 200
    code, text, _ = await get(http, url, inbound)
    assert code == 200, text
    assert recorder.requests[0]["headers"]["Authorization"].startswith("Bearer xchg-token-")


async def test_sts_unreachable_answers_502(issuer, gateway, recorder, http) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/token"
    url = await gateway(recorder.url, auth=exchange_auth(issuer, endpoint))
    inbound = issuer.mint()
    code, text, headers = await get(http, url, inbound)
    assert code == 502, text
    error = json.loads(text)["error"]
    assert error["code"] == "token_exchange_failed" and error["retryable"] is True
    assert SECRET not in text and inbound not in text
    assert recorder.requests == []


# --------------------------------------------------------------------------- TokenExchanger on a FakeClock


def exchanger_on(sts, clock: FakeClock) -> TokenExchanger:
    return TokenExchanger(ExchangeConfig(token_endpoint=sts.token_endpoint, client_id=CLIENT_ID,
                                         client_secret=SECRET), clock)


async def test_token_exchanger_expiry_margin_on_fake_clock(sts, clock: FakeClock) -> None:
    exchanger = exchanger_on(sts, clock)
    sts.expires_in = 100  # usable for 100 - 30 = 70 s
    async with aiohttp.ClientSession() as session:
        exchanger.start(session)
        assert await exchanger.token_for("subject") == "xchg-token-1"
        clock.advance(69.5)
        assert await exchanger.token_for("subject") == "xchg-token-1"
        clock.advance(1)
        assert await exchanger.token_for("subject") == "xchg-token-2"
        assert await exchanger.token_for(None) == "cc-token-3"
        assert await exchanger.token_for(None) == "cc-token-3"
        sts.status = 503
        clock.advance(71)
        with pytest.raises(ExchangeFailed) as failed:
            await exchanger.token_for("subject")
        assert failed.value.retryable and SECRET not in str(failed.value)
    assert [f["grant_type"] for f in sts.forms][:3] == [TOKEN_EXCHANGE, TOKEN_EXCHANGE, "client_credentials"]


async def test_short_lived_exchanged_tokens_are_still_cached_and_429_is_retryable(sts, clock: FakeClock) -> None:
    exchanger = exchanger_on(sts, clock)
    sts.expires_in = 20  # shorter than the 30 s margin: kept for half its life
    async with aiohttp.ClientSession() as session:
        exchanger.start(session)
        assert await exchanger.token_for("subject") == "xchg-token-1"
        clock.advance(9.5)
        assert await exchanger.token_for("subject") == "xchg-token-1"
        clock.advance(1)
        sts.status = 429
        with pytest.raises(ExchangeFailed) as failed:
            await exchanger.token_for("subject")
        assert failed.value.retryable


# --------------------------------------------------------------------------- the secret stays secret


@pytest.mark.parametrize("source", ["yaml", "env"])
def test_check_config_never_prints_the_client_secret(tmp_path, source) -> None:
    exchange: dict[str, Any] = {"token_endpoint": "http://127.0.0.1:8089/token", "client_id": CLIENT_ID}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARP_", "JARVIS_"))}
    if source == "yaml":
        exchange["client_secret"] = SECRET
    else:
        env["ARP_AUTH_CLIENT_SECRET"] = SECRET
    raw = {"auth": {"mode": "required", "forward_token": "exchange", "exchange": exchange,
                    "issuers": [{"issuer": "http://127.0.0.1:8089", "audiences": [AUD]}]}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([str(ARP_GATEWAY), "check-config", "--config", str(path)], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["auth"]["exchange"]["client_secret"] == "***"
    assert printed["auth"]["exchange"]["client_id"] == CLIENT_ID


# --------------------------------------------------------------------------- secret file rotation


def kubelet_secret_dir(base: Path, secret: str) -> Path:
    """A mounted Secret as the kubelet lays it out: the file is a link through `..data`."""
    (base / "..v1").mkdir(parents=True)
    (base / "..v1" / "client-secret").write_text(secret + "\n")
    (base / "..data").symlink_to("..v1")
    (base / "client-secret").symlink_to("..data/client-secret")
    return base / "client-secret"


def kubelet_swap(base: Path, version: str, secret: str | None) -> None:
    """The kubelet's update: a new directory, then one rename of a fresh `..data` link over the old."""
    (base / version).mkdir()
    if secret is not None:
        (base / version / "client-secret").write_text(secret + "\n")
    (base / "..data_tmp").symlink_to(version)
    os.rename(base / "..data_tmp", base / "..data")


async def test_a_rotated_secret_file_is_used_without_a_restart(issuer, sts, gateway, recorder, http, tmp_path,
                                                               caplog) -> None:
    first, second, third = "first-secret-a1b2c3", "second-secret-d4e5f6", "third-secret-g7h8i9"
    path = kubelet_secret_dir(tmp_path / "exchange", first)
    url = await gateway(recorder.url, auth=exchange_auth(issuer, sts.token_endpoint, exchange={
        "client_secret": None, "client_secret_file": str(path)}))
    assert (await get(http, url, issuer.mint(sub="alice")))[0] == 200

    kubelet_swap(tmp_path / "exchange", "..v2", second)
    assert (await get(http, url, issuer.mint(sub="bob")))[0] == 200  # a new subject: a new exchange

    # The Secret's key vanishes: the last good secret stays in use, with one warning for two exchanges.
    kubelet_swap(tmp_path / "exchange", "..v3", None)
    assert (await get(http, url, issuer.mint(sub="carol")))[0] == 200
    assert (await get(http, url, issuer.mint(sub="dave")))[0] == 200

    kubelet_swap(tmp_path / "exchange", "..v4", third)
    assert (await get(http, url, issuer.mint(sub="erin")))[0] == 200

    assert [f["client_secret"] for f in sts.forms] == [first, second, second, second, third]
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "secret_file_unreadable"]
    assert len(warnings) == 1 and warnings[0].key == "auth.exchange.client_secret_file"
    assert "No such file" in warnings[0].reason
    logged = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    assert not any(s in logged for s in (first, second, third))
