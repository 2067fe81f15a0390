"""Cost per request of token verification: a full RS256 verification against a verified-token cache hit.

    .venv/bin/python tests/bench/verify_cost.py [--seconds 2]

Both are measured in this one process, interleaved, and reported with their
ratio: the machine is shared, so absolute microseconds move between runs.
No network: the key set is loaded into the JWKS cache directly, as a fetch
would leave it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey, RSAKey  # noqa: E402

from proxy.util.clock import SystemClock  # noqa: E402
from proxy.settings.config import build_config  # noqa: E402
from proxy.auth.jwks_refresh import JwksRegistry  # noqa: E402
from proxy.auth.principal import Principal  # noqa: E402
from proxy.auth.tokens import TokenVerifier  # noqa: E402

ISSUER = "http://127.0.0.1:1/bench"


def verifier(alg: str, key, cache_size: int) -> TokenVerifier:
    cfg = build_config({"auth": {"mode": "required", "token_cache_size": cache_size, "issuers": [
        {"issuer": ISSUER, "audiences": ["arp-run-gateway"], "jwks_uri": ISSUER + "/jwks", "algorithms": [alg]}]}})
    registry = JwksRegistry(cfg.auth, SystemClock())
    registry.refresher(ISSUER).set_remote_jwks({"keys": [key.as_dict(private=False)]})
    return TokenVerifier(cfg.auth, registry, SystemClock())


async def per_call(fn, token: str, seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            decided = fn(token)  # the Principal now (a cached verdict), or the coroutine that decides
            if not isinstance(decided, Principal):
                await decided
        calls += 200
    return (time.perf_counter() - start) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (bounded loop)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'alg':6} {'full verify µs':>15} {'cache hit µs':>13} {'ratio':>7}")
    for alg, key in (("RS256", RSAKey.generate_key(2048, parameters={"kid": "r"})),
                     ("ES256", ECKey.generate_key("P-256", parameters={"kid": "e"}))):
        now = int(time.time())
        token = jwt.encode({"alg": alg, "kid": key.kid}, {"iss": ISSUER, "aud": "arp-run-gateway", "sub": "bench",
                                                           "exp": now + 3600, "iat": now}, key, algorithms=[alg])
        full, cached = verifier(alg, key, 0), verifier(alg, key, 1000)
        await cached.verify(token)                               # fill the cache (a new token: a coroutine)
        fulls, hits = [], []
        for _ in range(args.rounds):
            fulls.append(await per_call(full.verify, token, args.seconds))
            hits.append(await per_call(cached.verify, token, args.seconds))
        f, h = statistics.median(fulls), statistics.median(hits)
        print(f"{alg:6} {f:15.1f} {h:13.2f} {f / h:6.0f}x")


if __name__ == "__main__":
    asyncio.run(main())
