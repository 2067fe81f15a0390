"""Observability as operators meet it: a real Prometheus scrapes the gateway, logs stay clean."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from proxy.dev import issuer as devissuer
from proxy.observability.metrics import AuthStateCollector, GatewayMetrics
from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START, gateway_config
from tests.support.process import ROOT, free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL),
                                reason="Debian package prometheus is not installed (bash .ci/run installs it)")




async def start_observed_gateway(coordinator: str, issuer: devissuer.DevIssuer | None = None):
    auth = {"mode": "disabled"}
    if issuer is not None:
        auth = {"mode": "required", "issuers": [{"issuer": issuer.url, "audiences": ["arp-run-gateway"]}]}
    cfg = gateway_config(coordinator, auth=auth,
                         metrics={"enabled": True, "host": "127.0.0.1", "port": free_port()})
    runner, url = await start_gateway(cfg)
    return runner, url, runner.gateway.ops_url


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: gateway\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self, http: aiohttp.ClientSession) -> None:
        async with asyncio.timeout(30):
            while True:
                try:
                    async with http.get(self.url + "/-/ready") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectorError:
                    pass
                await asyncio.sleep(0.2)  # a real server starting

    async def value(self, http: aiohttp.ClientSession, query: str) -> float | None:
        async with http.get(self.url + "/api/v1/query", params={"query": query}) as resp:
            data = await resp.json()
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    async def wait_for(self, http: aiohttp.ClientSession, query: str, expected: float) -> float | None:
        """Polls until Prometheus has scraped the expected value (bounded: 30 s)."""
        got = None
        for _ in range(150):
            got = await self.value(http, query)
            if got == expected:
                return got
            await asyncio.sleep(0.2)  # the next scrape of a real Prometheus
        return got

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def test_real_prometheus_scrapes_exact_counts(tmp_path, coordinator):
    http = aiohttp.ClientSession()
    issuer_runner, issuer = await devissuer.start(port=0)
    runner, url, ops = await start_observed_gateway(coordinator, issuer)
    prometheus = Prometheus(tmp_path, ops.removeprefix("http://"))
    try:
        await prometheus.ready(http)
        good = {"Authorization": f"Bearer {issuer.mint(sub='alice')}"}
        run_ids = []
        for _ in range(3):
            async with http.post(url + "/v1/runs", json=RUN_START, headers=good) as resp:
                assert resp.status == 200
                run_ids.append((await resp.json())["run_id"])
        for _ in range(2):
            async with http.post(url + "/v1/runs", json=RUN_START) as resp:
                assert resp.status == 401
        async with http.post(url + "/v1/runs", json=RUN_START, headers={"Authorization": "Bearer x.y.z"}) as resp:
            assert resp.status == 401
        for path in ("/v1/nope", "/v1/node-runs"):
            async with http.get(url + path) as resp:
                assert resp.status == 404
        async with http.get(f"{url}/v1/runs/{run_ids[0]}/events", headers=good) as resp:
            lines = [line async for line in resp.content]

        expectations = {
            'sum(arp_gateway_requests_total{route="/v1/runs",method="POST",code="200"})': 3,
            'sum(arp_gateway_requests_total{route="/v1/runs",method="POST",code="401"})': 3,
            'sum(arp_gateway_requests_total{route="unmatched",code="404"})': 2,
            'sum(arp_gateway_requests_total{route="/v1/runs/{run_id}/events",code="200"})': 1,
            'sum(arp_gateway_stream_lines_total)': len(lines),
            'sum(arp_gateway_streams_open)': 0,
            f'sum(arp_gateway_auth_decisions_total{{issuer="{issuer.url}",result="allowed"}})': 4,
            'sum(arp_gateway_auth_decisions_total{result="unauthenticated",reason="missing_token"})': 2,
            'sum(arp_gateway_auth_decisions_total{result="unauthenticated",reason="malformed"})': 1,
            f'sum(arp_gateway_jwks_keys{{issuer="{issuer.url}"}})': 1,
            'sum(arp_gateway_token_cache_requests_total{result="hit"})': 3,
            'sum(arp_gateway_build_info)': 1,
        }
        for query, expected in expectations.items():
            assert await prometheus.wait_for(http, query, expected) == expected, query
        assert await prometheus.value(http, "sum(process_resident_memory_bytes)") > 0
        async with http.get(ops + "/metrics") as resp:
            exposition = await resp.text()
        token = good["Authorization"].split()[1]
        assert token[:30] not in exposition and "alice" not in exposition and run_ids[0] not in exposition
    finally:
        prometheus.stop()
        await runner.cleanup()
        await issuer_runner.cleanup()
        await http.close()


async def test_scrape_output_passes_promtool_and_labels_stay_bounded(coordinator, http):
    runner, url, ops = await start_observed_gateway(coordinator)
    try:
        for n in range(1000):
            async with http.get(f"{url}/v1/runs/run-{n}") as resp:
                assert resp.status == 404          # the dev coordinator knows none of them
        async with http.get(ops + "/metrics") as resp:
            exposition = await resp.text()
        checked = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        series = [line for line in exposition.splitlines() if line.startswith("arp_gateway_requests_total{")]
        assert series == ['arp_gateway_requests_total{code="404",method="GET",route="/v1/runs/{run_id}"} 1000.0']
        assert "run-1" not in exposition
        # The public port never serves metrics when a metrics port is configured.
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 404
    finally:
        await runner.cleanup()


async def test_metrics_on_the_main_listener_when_port_is_0(coordinator, http):
    runner, url = await start_gateway(gateway_config(coordinator, metrics={"enabled": True, "port": 0}))
    try:
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 200 and "arp_gateway_build_info" in await resp.text()
    finally:
        await runner.cleanup()


def test_alert_rules_pass_promtool():
    checked = subprocess.run([PROMTOOL, "check", "rules", str(ROOT / "deploy/monitoring/alerts.yaml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def exported_names() -> set[str]:
    metrics = GatewayMetrics()
    metrics.watch(AuthStateCollector([], SimpleNamespace(cache_hits=0, cache_misses=0)))
    names = set()
    for family in metrics.registry.collect():
        names.update(sample.name for sample in family.samples)
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


@pytest.mark.parametrize("asset", ["grafana-dashboard.json", "alerts.yaml"])
def test_monitoring_assets_only_name_metrics_the_gateway_exports(asset):
    text = (ROOT / "deploy/monitoring" / asset).read_text()
    used = set(re.findall(r"arp_gateway_[a-z_]+", text))
    histogram_parts = {n + s for n in exported_names() for s in ("_bucket", "_count", "_sum")}
    assert used - exported_names() - histogram_parts == set()


async def test_access_log_lines_are_json_and_never_hold_tokens(coordinator, http):
    issuer_runner, issuer = await devissuer.start(port=0)
    secret_token = issuer.mint(sub="alice")
    out = io.StringIO()
    with redirect_stdout(out):
        cfg = gateway_config(coordinator, auth={"mode": "required", "issuers": [
            {"issuer": issuer.url, "audiences": ["arp-run-gateway"]}]})
        runner, url = await start_gateway(cfg)
        try:
            async with http.post(url + "/v1/runs", json=RUN_START,
                                 headers={"Authorization": f"Bearer {secret_token}", "X-Request-ID": "req-42"}) as resp:
                assert resp.status == 200
            async with http.post(url + "/v1/runs", json=RUN_START,
                                 headers={"Authorization": f"Bearer {secret_token[:-3]}abc"}) as resp:
                assert resp.status == 401
        finally:
            await runner.cleanup()
            await issuer_runner.cleanup()
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("type") == "access"]
    assert [(e["request_id"], e["status"], e["auth"]) for e in access][:1] == [("req-42", 200, "allowed")]
    assert access[1]["auth_reason"] == "bad_signature"
    assert all("subject" not in e for e in access)        # off by default
    assert secret_token[:40] not in out.getvalue()
    assert "Bearer" not in out.getvalue()
