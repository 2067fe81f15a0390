"""`auth.exchange.client_secret_file`: the token-exchange secret from a mounted file, never printed."""

from __future__ import annotations

import pytest

from proxy.settings.config import ConfigError, build_config, load_config, redacted

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


# --------------------------------------------------------------------------- re-reading (proxy/secretfile.py)


def test_a_file_rewritten_in_place_is_read_again(tmp_path):
    from proxy.util.secretfile import SecretFile
    path = tmp_path / "client-secret"
    path.write_text("old-value\n")
    secret = SecretFile(str(path), "auth.exchange.client_secret_file", initial="old-value")
    assert secret.value() == "old-value"
    path.write_text("new-value-longer\n")
    assert secret.value() == "new-value-longer"


def test_an_unreadable_file_keeps_the_last_secret_and_warns_once_a_minute(tmp_path, caplog):
    from proxy.util.clock import FakeClock
    from proxy.util.secretfile import WARN_EVERY_S, SecretFile, SecretFileError
    clock = FakeClock()
    path = tmp_path / "client-secret"
    path.write_text("kept-secret-value\n")
    secret = SecretFile(str(path), "auth.exchange.client_secret_file", clock)
    assert secret.value() == "kept-secret-value"
    path.write_text("")  # emptied, as a half-written update would be
    for _ in range(3):
        assert secret.value() == "kept-secret-value"
    clock.advance(WARN_EVERY_S)
    path.unlink()
    assert secret.value() == "kept-secret-value"
    reasons = [r.reason for r in caplog.records if getattr(r, "event", "") == "secret_file_unreadable"]
    assert len(reasons) == 2 and "is empty" in reasons[0] and "No such file" in reasons[1]
    assert "kept-secret-value" not in caplog.text + "".join(str(vars(r)) for r in caplog.records)
    with pytest.raises(SecretFileError):  # nothing good was ever read: nothing to fall back on
        SecretFile(str(path), "k", clock).value()


def test_secret_file_from_the_environment_outranks_a_yaml_secret(tmp_path):
    secret = tmp_path / "client-secret"
    secret.write_text("from-the-file\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "auth:\n  issuers: [{issuer: 'http://127.0.0.1:9', audiences: [a]}]\n  forward_token: exchange\n"
        "  exchange: {token_endpoint: 'http://127.0.0.1:9/token', client_id: gw, client_secret: in-yaml}\n")
    cfg = load_config(config, {"ARP_AUTH_CLIENT_SECRET_FILE": str(secret)})
    assert cfg.auth.exchange.client_secret == "from-the-file"
    assert cfg.auth.exchange.client_secret_file == str(secret)
