"""Hypothesis-generated run_context shapes through the gateway into the real JARVIS Run Coordinator:
what its Run Store holds is the bound caller, and every member the client sent besides, unchanged.

The stack and the gateway live in one LoopThread for the module (hypothesis runs its examples
inside one synchronous test call); each example is one run start and one read of the Run Store.
"""

from __future__ import annotations

import http.client
import json
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START, gateway_config
from tests.support.jarvis import JarvisStack
from tests.support.loopthread import LoopThread

AUD = "arp-run-gateway"


@pytest.fixture(scope="module")
def stack(idp, tmp_path_factory) -> Iterator[dict[str, Any]]:
    with LoopThread() as lt:
        jarvis = JarvisStack(tmp_path_factory.mktemp("jarvis"), token_endpoint=idp.issuer + "/token")
        lt.run(jarvis.__aenter__(), timeout=120)
        try:
            cfg = gateway_config(jarvis.url, auth={"mode": "required",
                                                   "issuers": [{"issuer": idp.issuer, "audiences": [AUD]}]},
                                 runs={"bind_identity": True, "tenant_claim": "tenant"}, logging={"access_log": False})
            runner, url = lt.run(start_gateway(cfg))
            try:
                token = lt.run(idp.token({"sub": "alice", "aud": AUD, "tenant": "A"}))
                yield {"url": url, "token": token, "store": jarvis.store_url, "issuer": idp.issuer}
            finally:
                lt.run(runner.cleanup())
        finally:
            lt.run(jarvis.close())


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_json = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**53, max_value=2**53) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=6)
_objects = st.dictionaries(_text, _json, max_size=3)
_contexts = st.fixed_dictionaries({}, optional={
    "policy": _objects, "budgets": _objects,
    "trace": st.fixed_dictionaries({}, optional={"trace_id": _text, "span_id": _text}),
})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=_contexts, labels=st.dictionaries(_text, _text, max_size=3), first=st.booleans())
def test_generated_run_contexts_arrive_with_the_caller_bound_and_the_rest_unchanged(stack, context, labels, first):
    body = {"run_context": context, **RUN_START} if first else {**RUN_START, "run_context": context}
    body["metadata"] = {"labels": labels}
    target = urlsplit(stack["url"])
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        conn.request("POST", "/v1/runs", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {stack['token']}"})
        answer = conn.getresponse()
        started = json.loads(answer.read())
    finally:
        conn.close()
    assert answer.status == 200, started
    with urllib.request.urlopen(f"{stack['store']}/v1/runs/{started['run_id']}", timeout=30) as r:
        stored = json.loads(r.read())["run"]
    bound = stored["run_context"]
    assert bound["identity"] == {"iss": stack["issuer"], "sub": "alice"}
    assert bound["actor"]["id"] == "alice" and bound["tenant_id"] == "A"
    assert bound["trace"]["request_id"] == answer.getheader("X-Request-ID")
    for member in ("policy", "budgets"):
        assert bound.get(member) == context.get(member)
    for member in ("trace_id", "span_id"):
        assert bound["trace"].get(member) == context.get("trace", {}).get(member)
