"""The request-path counters as the exposition shows them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.observability import metrics as metrics_module
from proxy.observability.metrics import GatewayMetrics


def samples(metrics: GatewayMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    body, _ = metrics.exposition()
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(body.decode())
            for s in family.samples if s.name == name}


def test_each_request_is_counted_under_its_own_labels(monkeypatch) -> None:
    """Requests, durations and auth decisions are counted per label set, also for combinations past
    the bound on pre-built slots (a hostile coordinator chooses the status)."""
    monkeypatch.setattr(metrics_module, "MAX_REQUEST_SLOTS", 3)
    m = GatewayMetrics(issuers=("https://idp",))
    calls = [("/v1/runs", "POST", 200, ("https://idp", "allowed", "")),
             ("/v1/runs", "POST", 200, ("https://idp", "allowed", "")),
             ("/v1/runs", "POST", 401, ("https://other", "unauthenticated", "bad_signature")),
             ("/v1/runs/{run_id}", "GET", 200, ("https://idp", "allowed", "")),
             ("/v1/runs/{run_id}", "GET", 599, ("https://idp", "allowed", "")),
             ("/v1/runs/{run_id}", "GET", 599, ("https://idp", "allowed", "")),
             ("/v1/health", "BREW", 404, None)]
    for template, method, status, auth in calls:
        m.request(template, method, status, 0.002, auth)
    assert samples(m, "arp_gateway_requests_total") == {
        (("code", "200"), ("method", "POST"), ("route", "/v1/runs")): 2,
        (("code", "401"), ("method", "POST"), ("route", "/v1/runs")): 1,
        (("code", "200"), ("method", "GET"), ("route", "/v1/runs/{run_id}")): 1,
        (("code", "599"), ("method", "GET"), ("route", "/v1/runs/{run_id}")): 2,
        (("code", "404"), ("method", "other"), ("route", "/v1/health")): 1,
    }
    assert samples(m, "arp_gateway_auth_decisions_total") == {
        (("issuer", "https://idp"), ("reason", ""), ("result", "allowed")): 5,
        (("issuer", "none"), ("reason", "bad_signature"), ("result", "unauthenticated")): 1,
    }
    assert samples(m, "arp_gateway_request_duration_seconds_count") == {
        (("method", "POST"), ("route", "/v1/runs")): 3,
        (("method", "GET"), ("route", "/v1/runs/{run_id}")): 3,
        (("method", "other"), ("route", "/v1/health")): 1,
    }
    assert len(m._request_slots) == 3
