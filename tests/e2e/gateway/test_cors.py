"""CORS preflights: forwarded without credentials only when configured, otherwise 405 like any wrong method."""

from tests.support.gateway import json_response

PREFLIGHT = {"Origin": "http://127.0.0.1:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
AUTH = {"mode": "required", "issuers": [{"issuer": "http://127.0.0.1:9/idp", "audiences": ["a"],
                                         "jwks_uri": "http://127.0.0.1:9/jwks"}]}


async def test_preflight_is_refused_by_default(gateway, upstream, http):
    upstream.route("OPTIONS", "/v1/runs", lambda r: json_response(204))
    url = await gateway(await upstream.start(), auth=AUTH)
    async with http.options(url + "/v1/runs", headers=PREFLIGHT) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert upstream.requests == []


async def test_configured_bypass_forwards_the_preflight_without_auth(gateway, upstream, http):
    async def allow(request):
        return json_response(204, None, **{"Access-Control-Allow-Origin": request.headers["Origin"],
                                           "Access-Control-Allow-Methods": "POST"})

    upstream.route("OPTIONS", "/v1/runs", allow)
    url = await gateway(await upstream.start(), auth={**AUTH, "cors_preflight_bypass": True})
    async with http.options(url + "/v1/runs", headers=PREFLIGHT) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    (seen,) = upstream.requests
    assert seen["method"] == "OPTIONS" and "Authorization" not in seen["headers"]
    # Only real preflights pass: a bare OPTIONS is still a wrong method.
    async with http.options(url + "/v1/runs") as resp:
        assert resp.status == 405
    # And the bypass opens nothing else: the run itself still needs a token.
    async with http.post(url + "/v1/runs", json={}) as resp:
        assert resp.status == 401
