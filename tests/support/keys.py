"""Signing keys and a scripted JWKS server for unit tests of the JWKS store, fetcher, scheduler and verifier.

Real HTTP: `JwksServer` is a small aiohttp JWKS and discovery server on 127.0.0.1:0
that serves keys generated with joserfc, counts requests and fails on demand. It is
not an IdP (it issues no tokens); the IdP is the `idp` fixture (tests/support/idp.py).
`signer(name)` gives a private key (cached per process) that tests sign tokens
with and the server publishes; `claims_for` builds claims a verifier accepts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from joserfc import jws, jwt
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

from proxy.util.clock import FakeClock
from proxy.settings.config import AuthConfig, IssuerConfig
from proxy.auth.jwks_refresh import JwksRegistry

# The `registries` fixture (tests/conftest.py): `await registries(auth_config(jwks_server))` starts one.
Registries = Callable[..., Awaitable[JwksRegistry]]

AUDIENCE = "arp-run-gateway"
ASYM_ALGS = ("RS256", "PS256", "ES256", "EdDSA")


# --------------------------------------------------------------------------- keys and tokens


@dataclass(frozen=True)
class Signer:
    """A private key the JWKS server publishes (public half) and tests sign with."""

    key: Key
    kid: str | None
    alg: str

    def jwk(self, **extra: Any) -> dict[str, Any]:
        data = dict(self.key.as_dict(private=False))
        data.pop("kid", None)
        if self.kid is not None:
            data["kid"] = self.kid
        data.update(use="sig", alg=self.alg)
        data.update(extra)
        return data

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        head = {"alg": self.alg, "typ": "JWT", **({"kid": self.kid} if self.kid else {}), **header}
        head = {k: v for k, v in head.items() if v is not None}
        return jwt.encode(head, claims, self.key, algorithms=[head["alg"]])

    def sign_raw(self, payload: bytes, **header: Any) -> str:
        """Signs arbitrary payload bytes, e.g. JSON joserfc's encoder would never produce."""
        head = {"alg": self.alg, "typ": "JWT", "kid": self.kid, **header}
        return jws.serialize_compact(head, payload, self.key, algorithms=[self.alg])


@functools.cache
def _private_key(name: str, alg: str) -> Key:
    # Cached per process: 2048-bit RSA generation is the slow part of these tests.
    if alg.startswith(("RS", "PS")):
        return RSAKey.generate_key(2048)
    if alg == "ES256":
        return ECKey.generate_key("P-256")
    if alg == "EdDSA":
        return OKPKey.generate_key("Ed25519")
    raise ValueError(alg)


def signer(name: str, alg: str = "RS256", kid: str | None = "") -> Signer:
    """The same name always gives the same key; kid defaults to the name."""
    return Signer(_private_key(name, alg), name if kid == "" else kid, alg)


def claims_for(issuer: str, clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    now = int(clock.time())
    claims: dict[str, Any] = {
        "iss": issuer, "aud": AUDIENCE, "sub": "user-1", "iat": now, "nbf": now,
        "exp": now + 300, "scope": "runs:read runs:write",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


# --------------------------------------------------------------------------- the JWKS server


class JwksServer:
    """JWKS and discovery documents per tenant on 127.0.0.1:0, counting every request.

    `mode` makes the JWKS endpoint fail: "503", "bad_json", "no_keys_list",
    "empty_keys", "hang" (until the test ends) or "ok".
    """

    def __init__(self) -> None:
        self.keys: dict[str, list[dict[str, Any]]] = {}
        self.mode = "ok"
        self.cache_control: str | None = None
        self.discovery_issuer: dict[str, str] = {}
        self.hits: Counter[str] = Counter()
        self.base = ""
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tenant}/jwks", self._jwks)
        app.router.add_get("/{tenant}/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/evil/{tail:.*}", self._evil)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def issuer(self, tenant: str) -> str:
        return f"{self.base}/{tenant}"

    def jwks_uri(self, tenant: str) -> str:
        return f"{self.base}/{tenant}/jwks"

    def fetches(self, tenant: str) -> int:
        return self.hits[f"/{tenant}/jwks"]

    def publish(self, tenant: str, *signers: Signer) -> None:
        self.keys[tenant] = [s.jwk() for s in signers]

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        if self.mode == "503":
            return web.Response(status=503, text="down")
        if self.mode == "bad_json":
            return web.Response(text="{not json", content_type="application/json")
        if self.mode == "no_keys_list":
            return web.json_response({"keys": "nope"})
        if self.mode == "empty_keys":
            return web.json_response({"keys": []})
        if self.mode == "hang":
            await self._release.wait()
        return web.json_response({"keys": self.keys.get(request.match_info["tenant"], [])},
                                 headers=headers)

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        tenant = request.match_info["tenant"]
        return web.json_response({
            "issuer": self.discovery_issuer.get(tenant, self.issuer(tenant)),
            "jwks_uri": self.jwks_uri(tenant),
            "id_token_signing_alg_values_supported": list(ASYM_ALGS),
        })

    async def _evil(self, request: web.Request) -> web.Response:
        self.hits["evil"] += 1
        return web.json_response({"keys": []})


def issuer_config(server: JwksServer, tenant: str, **overrides: Any) -> IssuerConfig:
    base = IssuerConfig(issuer=server.issuer(tenant), audiences=(AUDIENCE,),
                        jwks_uri=server.jwks_uri(tenant), algorithms=ASYM_ALGS)
    return dataclasses.replace(base, **overrides)


def auth_config(server: JwksServer, *issuers: IssuerConfig, **overrides: Any) -> AuthConfig:
    issuers = issuers or (issuer_config(server, "a"), issuer_config(server, "b"))
    return dataclasses.replace(AuthConfig(issuers=issuers), **overrides)


async def park(_delay: float) -> None:
    """A sleep that never returns: keeps background refresh loops out of fetch counts."""
    await asyncio.Event().wait()
