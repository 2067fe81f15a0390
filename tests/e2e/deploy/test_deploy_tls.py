"""The optional TLS component (deploy/kubernetes/components/tls) on the production overlay, rendered by
the real `kubectl kustomize`: the certificate's Secret mounted read-only where the configuration reads
it, the public port named https, the probes as production has them, the configuration valid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings.config import build_config
from tests.support.certs import Pki
from tests.support.deploy import KUSTOMIZE, container, one, pod_spec, render, render_text, tool

COMPONENT = KUSTOMIZE / "components" / "tls"

pytestmark = pytest.mark.skipif(tool("kubectl") is None, reason="kubectl missing (.ci/run installs it)")


@pytest.fixture(scope="module")
def with_tls(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """production + the component, as an operator would enable it from an overlay of their own."""
    root = tmp_path_factory.mktemp("overlay")
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(KUSTOMIZE / "overlays" / "production", root)],
        "components": [os.path.relpath(COMPONENT, root)]}))
    return [d for d in yaml.safe_load_all(render_text(root)) if d]


def mounted_config(docs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    gateway = container(docs, "gateway")
    path = gateway["args"][gateway["args"].index("--config") + 1]
    spec = pod_spec(docs)
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "config")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    return path, yaml.safe_load(cm["data"][os.path.relpath(path, mount["mountPath"])])


def test_the_certificate_secret_is_mounted_read_only_where_the_config_reads_it(with_tls):
    path, cfg = mounted_config(with_tls)
    assert path == "/etc/arp-gateway/gateway-tls.yaml"
    tls = cfg["listen"]["tls"]
    certificate = one(with_tls, "Certificate")
    spec = pod_spec(with_tls)
    volume = next(v for v in spec["volumes"] if v.get("secret", {}).get("secretName") ==
                  certificate["spec"]["secretName"])
    mount = next(m for m in container(with_tls, "gateway")["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True and "subPath" not in mount   # a subPath mount never sees a renewal
    assert {Path(tls["cert_file"]).parent, Path(tls["key_file"]).parent} == {Path(mount["mountPath"])}
    assert {Path(tls["cert_file"]).name, Path(tls["key_file"]).name} == {"tls.crt", "tls.key"}


def test_the_public_port_is_https_and_the_probes_are_unchanged(with_tls):
    production = render("production")
    service = one(with_tls, "Service")
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("https", 443, 8080), ("metrics", 9464, 9464)]
    gateway = container(with_tls, "gateway")
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"https": 8080, "metrics": 9464}
    for name in ("gateway", "coordinator"):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container(with_tls, name).get(kind) == container(production, name).get(kind)
    assert one(with_tls, "NetworkPolicy") == one(production, "NetworkPolicy")


def test_the_tls_configuration_is_production_plus_listen_tls_and_valid(with_tls, tmp_path):
    _, cfg = mounted_config(with_tls)
    production = yaml.safe_load((KUSTOMIZE / "overlays" / "production" / "gateway.yaml").read_text())
    tls = cfg["listen"].pop("tls")
    assert cfg == production, "components/tls/gateway-tls.yaml drifted from the production gateway.yaml"
    pki = Pki(tmp_path)
    pair = pki.issue(pki.ca("deploy-ca"), "gateway")
    secret = tmp_path / "exchange-secret"
    secret.write_text("s3cret\n")
    cfg["listen"]["tls"] = {**tls, "cert_file": str(pair.cert), "key_file": str(pair.key)}
    cfg["auth"]["exchange"]["client_secret_file"] = str(secret)
    assert build_config(cfg).listen.tls.enabled
