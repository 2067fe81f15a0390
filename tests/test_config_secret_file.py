"""`auth.exchange.client_secret_file`: the token-exchange secret from a mounted file, never printed."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, build_config, load_config, redacted

ISSUER = {"issuer": "http://127.0.0.1:9", "audiences": ["a"]}


def exchange(**keys):
    return {"auth": {"issuers": [ISSUER], "forward_token": "exchange",
                     "exchange": {"token_endpoint": "http://127.0.0.1:9/token", "client_id": "gw", **keys}}}


def test_secret_is_read_from_the_file_without_its_final_newline(tmp_path):
    path = tmp_path / "client-secret"
    path.write_text("from-the-secret\n")
    cfg = build_config(exchange(client_secret_file=str(path)))
    assert cfg.auth.exchange.client_secret == "from-the-secret"
    shown = redacted(cfg)["auth"]["exchange"]
    assert shown["client_secret"] == "***" and shown["client_secret_file"] == str(path)


@pytest.mark.parametrize("content, problem", [(None, "cannot read"), ("\n", "is empty")])
def test_unreadable_or_empty_file_names_the_key(tmp_path, content, problem):
    path = tmp_path / "client-secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        build_config(exchange(client_secret_file=str(path)))
    assert any(p.startswith("auth.exchange.client_secret_file: ") and problem in p for p in err.value.problems)


def test_both_secret_and_file_is_refused(tmp_path):
    path = tmp_path / "client-secret"
    path.write_text("x")
    with pytest.raises(ConfigError) as err:
        build_config(exchange(client_secret="y", client_secret_file=str(path)))
    assert any("not both" in p for p in err.value.problems)


def test_environment_secret_outranks_the_yaml_file(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "auth:\n  issuers: [{issuer: 'http://127.0.0.1:9', audiences: [a]}]\n  forward_token: exchange\n"
        "  exchange: {token_endpoint: 'http://127.0.0.1:9/token', client_id: gw,"
        f" client_secret_file: '{tmp_path / 'absent'}'}}\n")
    cfg = load_config(config, {"ARP_AUTH_CLIENT_SECRET": "from-env"})
    assert cfg.auth.exchange.client_secret == "from-env" and cfg.auth.exchange.client_secret_file is None
