"""proxy/arp/routes.py alone: what the route table resolves, and what it refuses to."""

from __future__ import annotations

import pytest

from proxy.arp.routes import (
    ALL_ROUTES, CANCEL_RUN, GET_RUN, HEALTH, LIVEZ, METRICS, READYZ, RUN_EVENTS, START_RUN, VERSION, RouteTable,
)


@pytest.mark.parametrize("path, route", [
    ("/v1/health", HEALTH),
    ("/v1/version", VERSION),
    ("/livez", LIVEZ),
    ("/readyz", READYZ),
    ("/v1/runs", START_RUN),
    ("/v1/runs/run_1", GET_RUN),
    ("/v1/runs/run_1:cancel", CANCEL_RUN),
    ("/v1/runs/run_1/events", RUN_EVENTS),
    ("/v1/runs/run%201", GET_RUN),             # an encoded space is just part of the id
    ("/v1/runs/a:b", GET_RUN),                 # a colon that is not ":cancel"
])
def test_resolves_the_run_surface_and_the_gateways_own_routes(path: str, route: object) -> None:
    assert RouteTable().resolve(path) is route


@pytest.mark.parametrize("path", [
    "/v1/node-runs",
    "/v1/runs/",                   # no run id
    "/v1/runs/:cancel",            # no run id before :cancel
    "/v1/runs//events",
    "/v1/runs/x/other",
    "/v1/runs/x/events/more",
    "/v1/runs/..",
    "/v1/runs/.",
    "/v1/runs/%2E%2E/events",      # decodes to ..
    "/v1/runs/..%2Fnode-runs",     # decodes to a path
    "/v1/runs/a%2Fb",
    "/v1/runs/a%5Cb",              # an encoded backslash
    "/v1/runs/a\\b",
    "/v1/runs/a%2fb:cancel",
    "/v1/health/",
    "/V1/runs",
    "/metrics",                    # only on its own listener unless configured
    "",
])
def test_refuses_everything_else(path: str) -> None:
    assert RouteTable().resolve(path) is None


def test_metrics_on_the_main_listener_only_when_asked() -> None:
    assert RouteTable(metrics_on_main=True).resolve("/metrics") is METRICS
    assert RouteTable(metrics_on_main=False).resolve("/metrics") is None


def test_routes_carry_their_allow_header_and_compare_by_identity() -> None:
    assert START_RUN.allow == "POST" and GET_RUN.allow == "GET" and CANCEL_RUN.allow == "POST"
    assert RUN_EVENTS.streaming and RUN_EVENTS.forward and not HEALTH.forward
    assert len({r.template for r in ALL_ROUTES}) == len(ALL_ROUTES)
    twin = type(GET_RUN)(GET_RUN.name, GET_RUN.template, GET_RUN.methods, forward=True)
    assert twin != GET_RUN
