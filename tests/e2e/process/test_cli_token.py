"""`arp-gateway token` with the OAuth 2.0 client-credentials grant, and the local port-forward recipe.

Against the real loopback IdP (tests/idp, oauth2-mock-server) and small aiohttp stand-ins for IdPs
that misbehave. The secret is read from a file and must never appear in any output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

from aiohttp import web

from proxy.dev import coordinator as devcoordinator
from proxy.settings.config import load_config
from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START
from tests.support.deploy import ROOT
from tests.support.process import free_port
from tests.support.servers import serve_app

SECRET = "s3cr3t-never-printed-Zq9"


async def token_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "token", *args, cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def assert_one_clean_line(code: int, out: str, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, (code, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("arp-gateway token: "), err
    assert "Traceback" not in err and SECRET not in err
    for fragment in fragments:
        assert fragment in err, err


async def test_client_credentials_token_from_the_loopback_idp(tmp_path, idp):
    code, out, err = await token_cli("--issuer", idp.issuer, "--client-id", "arp-cli",
                                     "--client-secret-file", str(secret_file(tmp_path)),
                                     "--audience", "arp-run-gateway", "--scope", "runs:write runs:read")
    assert code == 0, err
    token = out.strip()
    assert token.count(".") == 2 and out.count("\n") == 1
    got = claims(token)
    assert got["iss"] == idp.issuer and got["aud"] == "arp-run-gateway" and got["scope"] == "runs:write runs:read"
    assert got["sub"] == "arp-cli"
    assert SECRET not in out + err


COORDINATOR_AUDIENCE = "arp-run-coordinator"


def claims_of_bearer(header: str | None) -> dict | None:
    if not header or not header.startswith("Bearer ") or header.count(".") != 2:
        return None
    try:
        return claims(header.removeprefix("Bearer "))
    except ValueError:
        return None


async def audience_checking_coordinator() -> tuple[web.AppRunner, str, list[dict | None]]:
    """The dev coordinator behind the check a production coordinator makes: the bearer token must be
    for its own audience, else 401 (as a real one answers the user's gateway-audience token)."""
    seen: list[dict | None] = []

    @web.middleware
    async def check_audience(request: web.Request, handler):
        got = claims_of_bearer(request.headers.get("Authorization"))
        seen.append(got)
        aud = got.get("aud") if got else None
        if COORDINATOR_AUDIENCE not in (aud if isinstance(aud, list) else [aud]):
            return web.json_response({"error": {"code": "unauthorized", "message": "wrong audience"}}, status=401)
        return await handler(request)

    app = devcoordinator.create_app(step_delay_s=0.05)
    app.middlewares.insert(0, check_audience)
    runner, url = await serve_app(app)
    return runner, url, seen


async def exchanging_sts(client_id: str) -> tuple[web.AppRunner, str, list[dict]]:
    """An RFC 8693 token endpoint that checks the client's credentials and issues a token for the
    audience asked for (unsigned: the stand-in coordinator reads its claims, as a test double may)."""
    forms: list[dict] = []

    def encode(part: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()

    async def token(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        forms.append(form)
        if form.get("client_id") != client_id or form.get("client_secret") != SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        subject = claims(form["subject_token"])
        issued = ".".join([encode({"alg": "none"}), encode({"sub": subject["sub"], "aud": form["audience"]}), "x"])
        return web.json_response({"access_token": issued, "token_type": "Bearer", "expires_in": 300,
                                  "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"})

    app = web.Application()
    app.router.add_post("/token", token)
    runner, url = await serve_app(app)
    return runner, url + "/token", forms


async def test_local_port_forward_recipe_end_to_end(tmp_path, http, idp):
    """config/local-port-forward.yaml, set up as the README's recipe says, in front of a coordinator
    on the port-forward's local end that accepts only tokens for its own audience: the developer's
    own client-credentials token (for the gateway's audience) reaches it exchanged, never as it is."""
    coordinator, coordinator_url, coordinator_saw = await audience_checking_coordinator()
    sts, token_endpoint, exchanges = await exchanging_sts("dev-laptop")
    env = {"ARP_AUTH_ISSUER": idp.issuer, "JARVIS_RUN_COORDINATOR_URL": coordinator_url,
           "ARP_AUTH_CLIENT_ID": "dev-laptop", "ARP_AUTH_CLIENT_SECRET_FILE": str(secret_file(tmp_path)),
           "ARP_AUTH_TOKEN_ENDPOINT": token_endpoint}
    cfg = load_config(ROOT / "config" / "local-port-forward.yaml", env,
                      {"listen.port": 0, "metrics.port": free_port()})
    assert cfg.listen.host == "127.0.0.1" and cfg.auth.mode == "required"
    runner, url = await start_gateway(cfg)
    try:
        async with http.post(url + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 401
        code, out, err = await token_cli("--issuer", idp.issuer, "--client-id", "dev-laptop",
                                         "--client-secret-file", str(secret_file(tmp_path)),
                                         "--audience", cfg.auth.issuers[0].audiences[0])
        assert code == 0, err
        assert claims(out.strip())["aud"] == "arp-run-gateway"
        headers = {"Authorization": f"Bearer {out.strip()}"}
        async with http.post(url + "/v1/runs", json=RUN_START, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            run = await resp.json()
        async with http.get(f"{url}/v1/runs/{run['run_id']}", headers=headers) as resp:
            assert resp.status == 200
        assert [c and c["aud"] for c in coordinator_saw] == [COORDINATOR_AUDIENCE] * 2
        assert [f["subject_token"] for f in exchanges] == [out.strip()]  # exchanged once, then cached
        assert exchanges[0]["audience"] == COORDINATOR_AUDIENCE
        # A token for another audience is refused, as in production.
        code, out, _ = await token_cli("--issuer", idp.issuer, "--client-id", "dev-laptop",
                                       "--client-secret-file", str(secret_file(tmp_path)),
                                       "--audience", "someone-else")
        async with http.post(url + "/v1/runs", json=RUN_START,
                             headers={"Authorization": f"Bearer {out.strip()}"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["details"]["reason"] == "audience_mismatch"
    finally:
        await runner.cleanup()
        await sts.cleanup()
        await coordinator.cleanup()


async def fake_idp(token_status: int = 200, token_body: dict | None = None, *, methods: list[str] | None = None,
                   token_endpoint: bool = True):
    seen: list[dict] = []

    async def discovery(request: web.Request) -> web.Response:
        base = f"http://{request.host}"
        doc: dict = {"issuer": base, "jwks_uri": base + "/jwks"}
        if token_endpoint:
            doc["token_endpoint"] = base + "/token"
        if methods is not None:
            doc["token_endpoint_auth_methods_supported"] = methods
        return web.json_response(doc)

    async def token(request: web.Request) -> web.Response:
        seen.append({"authorization": request.headers.get("Authorization"), "form": dict(await request.post())})
        return web.json_response(token_body or {"access_token": "a.b.c", "token_type": "Bearer"},
                                 status=token_status)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_post("/token", token)
    runner, url = await serve_app(app)
    return runner, url, seen


async def test_client_secret_basic_when_the_idp_advertises_it(tmp_path):
    runner, url, seen = await fake_idp(methods=["client_secret_basic", "client_secret_post"])
    try:
        code, out, err = await token_cli("--issuer", url, "--client-id", "my cli",
                                         "--client-secret-file", str(secret_file(tmp_path)))
    finally:
        await runner.cleanup()
    assert code == 0 and out == "a.b.c\n", err
    (request,) = seen
    assert base64.b64decode(request["authorization"].split()[1]).decode() == f"my%20cli:{SECRET}"
    assert request["form"] == {"grant_type": "client_credentials"}


async def test_client_secret_post_when_the_idp_only_takes_that(tmp_path):
    runner, url, seen = await fake_idp(methods=["client_secret_post"])
    try:
        code, _, err = await token_cli("--issuer", url, "--client-id", "cli",
                                       "--client-secret-file", str(secret_file(tmp_path)), "--scope", "runs")
    finally:
        await runner.cleanup()
    assert code == 0, err
    (request,) = seen
    assert request["authorization"] is None
    assert request["form"] == {"grant_type": "client_credentials", "client_id": "cli", "client_secret": SECRET,
                               "scope": "runs"}


async def test_missing_secret_file_is_one_line_exit_2(tmp_path):
    code, out, err = await token_cli("--issuer", "http://127.0.0.1:9", "--client-id", "cli",
                                     "--client-secret-file", str(tmp_path / "nope"))
    assert_one_clean_line(code, out, err, 2, "--client-secret-file", "No such file")


async def test_client_id_without_a_secret_file_is_refused(tmp_path):
    code, out, err = await token_cli("--issuer", "http://127.0.0.1:9", "--client-id", "cli")
    assert_one_clean_line(code, out, err, 2, "--client-secret-file")


async def test_idp_down_is_one_line_exit_1(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = await token_cli("--issuer", dead, "--client-id", "cli",
                                     "--client-secret-file", str(secret_file(tmp_path)))
    assert_one_clean_line(code, out, err, 1, "unreachable", dead)


async def test_discovery_without_token_endpoint_is_one_line_exit_1(tmp_path):
    runner, url, _ = await fake_idp(token_endpoint=False)
    try:
        code, out, err = await token_cli("--issuer", url, "--client-id", "cli",
                                         "--client-secret-file", str(secret_file(tmp_path)))
    finally:
        await runner.cleanup()
    assert_one_clean_line(code, out, err, 1, "no token_endpoint")


async def test_refused_credentials_name_the_oauth_error_not_the_body(tmp_path):
    body = {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}
    runner, url, _ = await fake_idp(401, body)
    try:
        code, out, err = await token_cli("--issuer", url, "--client-id", "cli",
                                         "--client-secret-file", str(secret_file(tmp_path)))
    finally:
        await runner.cleanup()
    assert_one_clean_line(code, out, err, 1, "HTTP 401", "(invalid_client)")
