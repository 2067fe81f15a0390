"""DEV-ONLY token issuer for `arp-gateway dev`: an ephemeral RS256 key served on loopback.

It publishes an OIDC discovery document and a JWKS like a real IdP, so the
gateway verifies its tokens through exactly the production code path, and it
mints tokens at `POST /dev/token` for loopback callers (`arp-gateway token`).
The key lives only in memory: restarting `arp-gateway dev` invalidates every
token it minted. Never point a production gateway at it.

    runner, issuer = await start(port=8089)
    token = issuer.mint(sub="alice", aud="arp-run-gateway", scope="runs", ttl=3600)
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey

from . import ISSUER_AUDIENCE as DEFAULT_AUDIENCE
from . import ISSUER_PORT as DEFAULT_PORT

MAX_TTL_S = 24 * 3600


class DevIssuer:
    def __init__(self) -> None:
        self.url = ""  # known once the listener is bound
        kid = "dev-" + os.urandom(6).hex()
        self.key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})

    def mint(self, *, sub: str = "dev-user", aud: str = DEFAULT_AUDIENCE, scope: str | None = None,
             ttl: int = 3600, extra: dict[str, Any] | None = None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "sub": sub, "aud": aud, "iat": now, "nbf": now,
                                  "exp": now + ttl, **(extra or {})}
        if scope:
            claims["scope"] = scope
        return jwt.encode({"alg": "RS256", "kid": self.key.kid, "typ": "JWT"}, claims, self.key,
                          algorithms=["RS256"])

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.url, "jwks_uri": self.url + "/jwks", "token_endpoint": self.url + "/dev/token",
                "id_token_signing_alg_values_supported": ["RS256"]}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def create_app(issuer: DevIssuer) -> web.Application:
    async def discovery(_: web.Request) -> web.Response:
        return web.json_response(issuer.discovery())

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(issuer.jwks())

    async def token(request: web.Request) -> web.Response:
        if not _loopback(request.remote):
            return web.json_response({"error": "access_denied"}, status=403)
        try:
            body = json.loads(await request.read() or b"{}")
            raw_ttl = body.get("ttl", 3600)
            # int() alone would take true as 1, 1.9 as 1 and raise OverflowError (a 500) on 1e999.
            if isinstance(raw_ttl, bool) or (isinstance(raw_ttl, float) and not raw_ttl.is_integer()):
                raise TypeError("ttl must be a whole number of seconds")
            ttl = int(raw_ttl)
            sub, aud, scope = body.get("sub", "dev-user"), body.get("aud", DEFAULT_AUDIENCE), body.get("scope")
        except (ValueError, TypeError, AttributeError, OverflowError):
            return web.json_response({"error": "invalid_request"}, status=400)
        # str() of an object or list would mint a token for a subject like "{'admin': True}".
        if (not 0 < ttl <= MAX_TTL_S or (scope is not None and not isinstance(scope, str))
                or not isinstance(sub, str) or not sub or not isinstance(aud, str) or not aud):
            return web.json_response({"error": "invalid_request"}, status=400)
        access = issuer.mint(sub=sub, aud=aud, scope=scope, ttl=ttl)
        return web.json_response({"access_token": access, "token_type": "Bearer", "expires_in": ttl})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    app.router.add_post("/dev/token", token)
    return app


async def start(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[web.AppRunner, DevIssuer]:
    issuer = DevIssuer()
    runner = web.AppRunner(create_app(issuer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    issuer.url = f"http://{host}:{bound[1]}"
    return runner, issuer
