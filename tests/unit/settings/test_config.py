"""Configuration: precedence, JARVIS/ARP environment compatibility, and start-up failures by key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings.config import ConfigError, build_config, load_config, redacted

ROOT = Path(__file__).resolve().parents[3]


def problems_of(raw=None, env=None, flags=None, tmp_path=None) -> list[str]:
    path = None
    if raw is not None:
        path = tmp_path / "g.yaml"
        path.write_text(raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {}, flags)
    return info.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_ones():
    cfg = build_config({"auth": {"mode": "disabled"}})
    assert cfg.limits.max_body_bytes == 1024 * 1024
    assert cfg.shutdown_grace_s == 25 and cfg.drain_delay_s == 5
    assert cfg.auth.exempt_paths == ("/v1/health", "/v1/version")
    assert cfg.auth.clock_skew_s == 60 and cfg.auth.jwks_cache_ttl_s == 300
    assert cfg.upstream.url is None


def test_precedence_flag_over_env_over_yaml(tmp_path):
    path = write(tmp_path, "listen: {port: 1111}\nupstream: {url: 'http://127.0.0.1:1'}\nauth: {mode: disabled}\n")
    assert load_config(path, {}).upstream.url == "http://127.0.0.1:1"
    env = {"JARVIS_RUN_COORDINATOR_URL": "http://127.0.0.1:2/v1/"}
    assert load_config(path, env).upstream.url == "http://127.0.0.1:2"
    cfg = load_config(path, env, {"listen.port": 3333, "upstream.url": "http://127.0.0.1:3/"})
    assert cfg.listen.port == 3333 and cfg.upstream.url == "http://127.0.0.1:3"


@pytest.mark.parametrize("given", ["http://c:8081", "http://c:8081/", "http://c:8081/v1", "http://c:8081/v1/"])
def test_coordinator_url_is_normalised_like_jarvis(given):
    cfg = load_config(None, {"JARVIS_RUN_COORDINATOR_URL": given, "ARP_AUTH_MODE": "disabled"})
    assert cfg.upstream.url == "http://c:8081"


def test_arp_auth_variables_build_the_issuer():
    env = {"ARP_AUTH_MODE": "optional", "ARP_AUTH_ISSUER": "http://127.0.0.1:9/realms/arp",
           "ARP_AUTH_SERVICE_ID": "arp-run-gateway", "ARP_AUTH_ALGORITHMS": "RS256,ES256",
           "ARP_AUTH_JWKS_URI": "http://127.0.0.1:9/jwks", "ARP_AUTH_CLOCK_SKEW_SECONDS": "5",
           "ARP_AUTH_EXEMPT_PATHS": "/v1/health", "ARP_AUTH_DEV_SUBJECT": "me",
           "ARP_AUTH_ANONYMOUS_SUBJECT": "nobody", "JARVIS_RUN_COORDINATOR_AUDIENCE": "coord"}
    cfg = load_config(None, env)
    (issuer,) = cfg.auth.issuers
    assert cfg.auth.mode == "optional"
    assert issuer.issuer == "http://127.0.0.1:9/realms/arp" and issuer.audiences == ("arp-run-gateway",)
    assert issuer.algorithms == ("RS256", "ES256") and issuer.jwks_uri == "http://127.0.0.1:9/jwks"
    assert cfg.auth.clock_skew_s == 5 and cfg.auth.exempt_paths == ("/v1/health",)
    assert (cfg.auth.dev_subject, cfg.auth.anonymous_subject) == ("me", "nobody")
    assert cfg.auth.exchange.audience == "coord"


def test_audience_beats_service_id_and_discovery_url_is_kept():
    cfg = load_config(None, {"ARP_AUTH_ISSUER": "http://127.0.0.1:9", "ARP_AUTH_AUDIENCE": "a",
                             "ARP_AUTH_SERVICE_ID": "b",
                             "ARP_AUTH_OIDC_DISCOVERY_URL": "http://127.0.0.1:9/custom"})
    assert cfg.auth.issuers[0].audiences == ("a",)
    assert cfg.auth.issuers[0].discovery == "http://127.0.0.1:9/custom"
    derived = load_config(None, {"ARP_AUTH_ISSUER": "http://127.0.0.1:9/", "ARP_AUTH_AUDIENCE": "a"})
    assert derived.auth.issuers[0].discovery == "http://127.0.0.1:9/.well-known/openid-configuration"


def test_profiles():
    assert load_config(None, {"ARP_AUTH_PROFILE": "dev-insecure"}).auth.mode == "disabled"
    keycloak = load_config(None, {"ARP_AUTH_PROFILE": "dev-secure-keycloak", "ARP_AUTH_SERVICE_ID": "arp-run-gateway"})
    assert keycloak.auth.mode == "required"
    assert keycloak.auth.issuers[0].issuer == "http://localhost:8080/realms/arp-dev"
    # An explicit mode wins over the profile's preset.
    assert load_config(None, {"ARP_AUTH_PROFILE": "dev-insecure", "ARP_AUTH_MODE": "optional",
                              "ARP_AUTH_ISSUER": "http://127.0.0.1:9", "ARP_AUTH_AUDIENCE": "a"}).auth.mode == "optional"


def test_token_endpoint_derived_from_issuer_like_jarvis():
    cfg = load_config(None, {"ARP_AUTH_ISSUER": "http://127.0.0.1:9/realms/arp", "ARP_AUTH_AUDIENCE": "a",
                             "ARP_AUTH_CLIENT_ID": "gw", "ARP_AUTH_CLIENT_SECRET": "s3cret"})
    assert cfg.auth.exchange.token_endpoint == "http://127.0.0.1:9/realms/arp/protocol/openid-connect/token"


def test_every_problem_is_reported_with_its_key_path(tmp_path):
    problems = problems_of(
        "listen: {port: eighty}\nupstream: {url: 'ftp://x', retries: {attempts: 0}, colour: red}\n"
        "limits: {max_body_bytes: -1}\nauth: {mode: sometimes}\nshutdown_grace_s: NaN\nbogus: 1\n",
        tmp_path=tmp_path)
    text = "\n".join(problems)
    for expected in ("listen.port: not an integer", "upstream.url: not an http(s) URL",
                     "upstream.retries.attempts: must be >= 1", "upstream.colour: unknown key",
                     "limits.max_body_bytes: must be > 0", "auth.mode: must be one of",
                     "shutdown_grace_s: must be", "bogus: unknown key"):
        assert expected in text, text


def test_env_problems_name_the_variable():
    problems = problems_of(env={"ARP_AUTH_MODE": "disabled", "ARP_AUTH_CLOCK_SKEW_SECONDS": "soon"})
    assert problems == ["auth.clock_skew_s (from ARP_AUTH_CLOCK_SKEW_SECONDS): not a number: 'soon'"]


def test_auth_required_without_issuer_fails_at_start_up():
    problems = problems_of(env={})
    assert any(p.startswith("auth.issuers: auth.mode is 'required'") for p in problems), problems


def test_hmac_needs_an_explicit_long_secret(tmp_path):
    problems = problems_of("auth:\n  issuers:\n  - {issuer: 'http://127.0.0.1:9', audiences: [a], algorithms: [HS256]}\n",
                           tmp_path=tmp_path)
    assert "auth.issuers[0].algorithms: HMAC algorithms need an explicit hmac_secret" in problems


def test_access_rule_must_name_a_forwarded_route(tmp_path):
    problems = problems_of("auth:\n  mode: disabled\n  rules:\n  - {path: /v1/node-runs, scopes: [x]}\n",
                           tmp_path=tmp_path)
    assert problems[0].startswith("auth.rules[0].path: not a forwarded route template")


def test_redaction_hides_secrets():
    cfg = load_config(None, {"ARP_AUTH_MODE": "disabled", "ARP_AUTH_CLIENT_ID": "gw",
                             "ARP_AUTH_CLIENT_SECRET": "hunter2-very-secret"})
    assert "hunter2" not in repr(redacted(cfg))
    assert redacted(cfg)["auth"]["exchange"]["client_secret"] == "***"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=30)


def test_check_config_prints_the_resolved_config_redacted(tmp_path):
    path = write(tmp_path, "auth:\n  mode: disabled\n  exchange: {client_secret: topsecretvalue}\n")
    done = run_cli("check-config", "--config", str(path), env={"JARVIS_RUN_COORDINATOR_URL": "http://127.0.0.1:7/v1"})
    assert done.returncode == 0, done.stderr
    assert "url: http://127.0.0.1:7" in done.stdout
    assert "topsecretvalue" not in done.stdout + done.stderr and "client_secret: '***'" in done.stdout


def test_check_config_exits_2_with_one_line_per_problem(tmp_path):
    path = write(tmp_path, "upstream: {url: nope}\nlisten: {port: -3}\nauth: {mode: disabled}\n")
    done = run_cli("check-config", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["config error: listen.port: must be >= 0, got -3",
                                        "config error: upstream.url: not an http(s) URL: 'nope'"]


def test_serve_with_a_bad_config_exits_2_and_serves_nothing(tmp_path):
    path = write(tmp_path, "listen: {port: 0}\nauth: {mode: required}\n")
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 2 and "auth.issuers" in done.stderr
    assert done.stdout == ""


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path):
    assert run_cli("check-config", "--config", str(tmp_path / "missing.yaml")).returncode == 2
    bad = write(tmp_path, "listen: [unclosed\n")
    done = run_cli("check-config", "--config", str(bad))
    assert done.returncode == 2 and "not valid YAML" in done.stderr


def test_shipped_configs_are_valid():
    for name in ("gateway.example.yaml", "dev.yaml"):
        done = run_cli("check-config", "--config", str(ROOT / "config" / name),
                       env={"ARP_AUTH_ISSUER": "http://127.0.0.1:9", "ARP_AUTH_AUDIENCE": "a"})
        assert done.returncode == 0, (name, done.stderr)


def test_serve_on_a_busy_port_fails_cleanly(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path, f"listen: {{port: {port}}}\nauth: {{mode: disabled}}\nmetrics: {{enabled: false}}\n")
        done = run_cli("serve", "--config", str(path))
    assert done.returncode == 1
    assert '"event": "listen_failed"' in done.stdout
    assert "Unclosed" not in done.stdout + done.stderr


def test_workers_need_a_fixed_port():
    with pytest.raises(ConfigError) as info:
        build_config({"listen": {"workers": 2, "port": 0}, "auth": {"mode": "disabled"}})
    assert info.value.problems == ["listen.workers: several workers need a fixed listen.port to share"]
