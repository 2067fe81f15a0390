"""The configuration as models: what a new user sees from check-config, and the generated schema and reference.

A typo is one line with a suggestion, a YAML syntax error names the file and line, and the
committed JSON Schema and docs/configuration.md are what the models generate now.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.settings import reference
from proxy.settings.config import ConfigError, GatewayConfig, build_config, load_config

ROOT = Path(__file__).resolve().parents[3]


def check_config(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=30)


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return info.value.problems


# --------------------------------------------------------------------------- what a typo prints


def test_a_misspelt_audiences_is_one_line_with_a_suggestion(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("auth:\n  issuers:\n  - issuer: https://idp.example.com/realms/arp\n    audience: [arp-run-gateway]\n")
    done = check_config(path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "config error: auth.issuers[0].audience: unknown key; did you mean audiences?"]


def test_a_misspelt_section_is_one_line_not_a_missing_issuer(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("auth:\n  issuer:\n  - {issuer: 'https://idp.example.com', audiences: [a]}\n")
    done = check_config(path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["config error: auth.issuer: unknown key; did you mean issuers?"]


@pytest.mark.parametrize("raw, line", [
    ({"listn": {"port": 9000}}, "listn: unknown key; did you mean listen?"),
    ({"Listen": {"port": 9000}}, "Listen: unknown key; did you mean listen?"),
    ({"upstream": {"max_conections": 5}}, "upstream.max_conections: unknown key; did you mean max_connections?"),
    ({"auth": {"audiences": ["a"]}}, "auth.audiences: unknown key; did you mean issuers[].audiences?"),
    ({"limits": {"colour": "red"}}, "limits.colour: unknown key"),
])
def test_an_unknown_key_gets_a_did_you_mean(raw, line):
    assert problems({**raw, "auth": {"mode": "disabled", **raw.get("auth", {})}}) == [line]


def test_a_yaml_syntax_error_names_the_file_and_line_on_one_line(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("listen:\n  port: 8080\n   host: 0.0.0.0\n")
    done = check_config(path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"config error: --config: {path}:3:8: not valid YAML: mapping values are not allowed here"]
    assert "<unicode string>" not in done.stderr


def test_every_problem_in_separate_sections_is_still_reported():
    lines = problems({"listen": {"port": -1}, "upstream": {"url": "nope"}, "auth": {"mode": "sometimes"},
                      "logging": {"level": "loud"}})
    assert [line.split(":")[0] for line in lines] == ["listen.port", "upstream.url", "auth.mode", "logging.level"]


def test_flag_beats_environment_beats_yaml_beats_default(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("auth: {mode: disabled, clock_skew_s: 5, dev_subject: from-yaml}\nlisten: {port: 1111}\n")
    env = {"ARP_AUTH_DEV_SUBJECT": "from-env", "ARP_AUTH_CLOCK_SKEW_SECONDS": "7"}
    cfg = load_config(path, env, {"listen.port": 2222, "auth.dev_subject": "from-flag"})
    assert (cfg.listen.port, cfg.auth.dev_subject, cfg.auth.clock_skew_s) == (2222, "from-flag", 7)
    assert load_config(path, env).auth.dev_subject == "from-env"
    assert load_config(path, {}).auth.clock_skew_s == 5
    assert load_config(path, {}).auth.anonymous_subject == "anonymous"


# --------------------------------------------------------------------------- schema and reference


def test_the_committed_schema_and_reference_are_what_the_models_generate():
    stale = reference.stale(ROOT)
    assert not stale, (f"{', '.join(map(str, stale))} differ from the configuration models: "
                       f"run `{reference.COMMAND}` and commit the result")


def test_the_check_command_reports_a_stale_reference(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "config").mkdir()
    (tmp_path / "docs").mkdir()
    assert reference.main(["--write", "--root", str(tmp_path)]) == 0
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0
    doc = tmp_path / "docs" / "configuration.md"
    doc.write_text(doc.read_text().replace("`listen.port`", "`listen.prt`"))
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1


def _key_paths(model: type, prefix: str = "") -> list[str]:
    paths = []
    hints = typing.get_type_hints(model)
    for f in dataclasses.fields(model):
        path = f"{prefix}{f.name}"
        inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if inner:
            many = typing.get_origin(hints[f.name]) is tuple
            paths += _key_paths(inner[0], f"{path}{'[]' if many else ''}.")
        if not inner or prefix:
            paths.append(path)
    return paths


def test_the_reference_documents_every_key_with_its_default():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text.startswith("# Configuration reference") and reference.COMMAND in text
    keys = _key_paths(GatewayConfig)
    assert len(keys) > 57
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "| `limits.max_body_bytes` | integer > 0 | `1048576` |" in text
    assert "| `auth.issuers[].issuer` | string | required | `ARP_AUTH_ISSUER` |" in text


@pytest.mark.parametrize("name", ["gateway.example.yaml", "local-port-forward.yaml", "dev.yaml"])
def test_the_shipped_configurations_validate_against_the_generated_schema(name):
    schema = yaml.safe_load((ROOT / "config" / "gateway.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    document = yaml.safe_load((ROOT / "config" / name).read_text())
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(document)]
    assert errors == []


def test_the_schema_rejects_what_the_gateway_rejects():
    validator = jsonschema.Draft202012Validator(reference.schema())
    for bad in ({"listn": {}}, {"listen": {"port": -1}}, {"auth": {"mode": "sometimes"}},
                {"auth": {"issuers": [{"issuer": "https://i"}]}}, {"upstream": {"stream_share": 2}}):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ConfigError):
            build_config({"auth": {"mode": "disabled"}, **bad} if "auth" not in bad else bad)


def test_the_example_names_the_schema_for_editors():
    first = (ROOT / "config" / "gateway.example.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./gateway.schema.json"


@pytest.mark.parametrize("raw", [
    {"auth": {"mode": "disabled", "exchange": {"client_secret": 918273645546372819}}},
    {"auth": {"issuers": [{"issuer": "https://i", "audiences": ["a"], "hmac_secret": ["918273645546372819"]}]}},
])
def test_a_mistyped_secret_is_not_echoed(raw):
    (line,) = problems(raw)
    assert "918273645546372819" not in line and "secret" in line.split(":")[0]


def test_null_means_the_default_but_an_unknown_key_set_to_null_is_still_unknown():
    cfg = build_config({"auth": {"mode": "disabled", "realm": None}, "listen": {"port": None}})
    assert (cfg.auth.realm, cfg.listen.port) == ("arp-run-gateway", 8080)
    assert problems({"auth": {"mode": "disabled"}, "listen": {"colour": None}}) == ["listen.colour: unknown key"]


@pytest.mark.parametrize("raw, line", [
    ({"limits": {"run_start_rate": {"per_second": 1, "burst": 2, "backend": "redis"}}},
     "redis.url: limits.run_start_rate.backend is 'redis' but no Redis is configured"),
    ({"limits": {"run_start_rate": {"per_second": 1, "burst": 2, "key": "tenant"}}},
     "limits.run_start_rate.tenant_claim: key: tenant needs the claim that names the tenant (here or in "
     "runs.tenant_claim)"),
    ({"redis": {"url": "http://cache:6379"}}, "redis.url: not a redis:// or rediss:// URL: 'http://cache:6379'"),
    ({"redis": {"url": "redis://:hunter2@cache:6379"}},
     "redis.url: a password in the URL would be shown by check-config; use redis.password_file"),
    ({"redis": {"url": "redis://cache:6379/zero"}},
     "redis.url: the path must be a database number (redis://host:6379/0), got '/zero'"),
    ({"redis": {"key_prefix": "a b"}}, None),
    ({"redis": {"timeout_ms": 0}}, None),
])
def test_redis_and_rate_problems_name_their_key(raw, line):
    found = problems({**raw, "auth": {"mode": "disabled"}})
    assert len(found) == 1 and "hunter2" not in found[0]
    key = next(iter(raw))
    assert found[0] == line if line else found[0].startswith(f"{key}.")


# --------------------------------------------------------------------------- runs and authorization (issue 18)


def test_tenant_access_needs_the_tenant_claim():
    assert problems({"auth": {"mode": "disabled"}, "runs": {"access": "tenant"}}) == [
        "runs.tenant_claim: required when runs.access is 'tenant'"]


def test_a_policy_that_fails_to_parse_fails_start_up_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"Statement": [{"Effect": "Allow", "Action": "run:Get"}]}')
    found = problems({"auth": {"mode": "disabled"}, "authorization": {"policy_file": str(path)}})
    assert len(found) == 1 and found[0].startswith(f"authorization.policy_file: {path}: ")
    assert "Resource" in found[0]


def test_the_shipped_policies_load():
    for path in sorted((ROOT / "config" / "policies").glob("*.json")):
        cfg = build_config({"auth": {"mode": "disabled"}, "authorization": {"policy_file": str(path)}})
        assert cfg.authorization.policy_file == str(path)
