"""The gateway as real ARP clients see it: the conformance suite and the ARP Python client."""

from __future__ import annotations

import asyncio

from arp_standard_client.errors import ArpApiError
from arp_standard_client.run_gateway import RunGatewayClient
from arp_standard_model import (
    NodeTypeRef,
    RunGatewayCancelRunParams,
    RunGatewayCancelRunRequest,
    RunGatewayGetRunParams,
    RunGatewayGetRunRequest,
    RunGatewayStartRunRequest,
    RunStartRequest,
)

from tests.support.conformance import run_conformance


async def test_conformance_surface_passes_with_dev_coordinator(gateway, coordinator):
    url = await gateway(coordinator)
    result = await run_conformance(url, tier="surface", strict=True)
    assert result.ok, result.summary()
    # The run checks use random ids and an invalid body: the coordinator's 404s and the
    # gateway's own 400 must be what answered, not a blanket refusal.
    codes = {r["check_id"]: (r.get("exchange") or {}).get("status_code") for r in result.results}
    assert codes["surface.03"] == 400 and codes["surface.04"] == 404 and codes["surface.05"] == 404, codes


def _client_round_trip(url: str) -> tuple[str, str, str, str]:
    client = RunGatewayClient(url)
    body = RunStartRequest(root_node_type_ref=NodeTypeRef(node_type_id="jarvis.composite.planner.general",
                                                          version="0.3.3"),
                           input={"goal": "Generate a UUID, then return it."})
    started = client.start_run(RunGatewayStartRunRequest(body=body))
    fetched = client.get_run(RunGatewayGetRunRequest(params=RunGatewayGetRunParams(run_id=started.run_id)))
    canceled = client.cancel_run(RunGatewayCancelRunRequest(params=RunGatewayCancelRunParams(run_id=started.run_id)))
    try:
        client.get_run(RunGatewayGetRunRequest(params=RunGatewayGetRunParams(run_id="no-such-run")))
        missing = "found"
    except ArpApiError as exc:
        missing = exc.code
    return started.run_id, fetched.run_id, canceled.state.value, missing


async def test_arp_python_client_starts_gets_and_cancels_a_run(gateway, coordinator):
    url = await gateway(coordinator)
    started, fetched, state, missing = await asyncio.to_thread(_client_round_trip, url)
    assert started == fetched
    assert state == "canceled"
    assert missing == "run_not_found"
