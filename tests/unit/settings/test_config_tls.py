"""`listen.tls`, `upstream.tls` and `require_certificate_binding`: a problem fails start-up with
one line naming the key, before any handshake could fail."""

from __future__ import annotations

import pytest

from proxy.settings.config import ConfigError, build_config
from tests.support.certs import Pki

ISSUER = {"issuer": "http://127.0.0.1:9", "audiences": ["a"]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("pki"))
    ca = pki.ca("cfg-ca")
    return {"ca": ca, "good": pki.issue(ca, "cfg-good"), "other": pki.issue(ca, "cfg-other"),
            "expired": pki.issue(ca, "cfg-expired", expired=True)}


def problems_of(raw):
    with pytest.raises(ConfigError) as err:
        build_config({"auth": {"mode": "disabled"}, **raw})
    return err.value.problems


def test_listener_tls_is_off_by_default_and_on_with_a_pair(pki):
    assert not build_config({"auth": {"mode": "disabled"}}).listen.tls.enabled
    good = pki["good"]
    cfg = build_config({"auth": {"mode": "disabled"},
                        "listen": {"tls": {"cert_file": str(good.cert), "key_file": str(good.key),
                                           "min_version": 1.3, "session_tickets": 0}}})
    assert cfg.listen.tls.enabled and cfg.listen.tls.min_version == "1.3" and cfg.listen.tls.session_tickets == 0
    assert build_config({"auth": {"mode": "disabled"}}).listen.tls.session_tickets == 2   # OpenSSL's own


@pytest.mark.parametrize("tls, line", [
    ({"cert_file": "/absent.crt", "key_file": "KEY"}, "listen.tls.cert_file: cannot read /absent.crt"),
    ({"cert_file": "EXPIRED", "key_file": "EXPIRED_KEY"}, "listen.tls.cert_file: "),
    ({"cert_file": "CERT", "key_file": "OTHER_KEY"}, "listen.tls.key_file: "),
    ({"cert_file": "CERT"}, "listen.tls.key_file: set listen.tls.cert_file and listen.tls.key_file together"),
    ({"cert_file": "CERT", "key_file": "KEY", "client_auth": "required"}, "listen.tls.client_ca_file: "),
    ({"cert_file": "CERT", "key_file": "KEY", "min_version": "1.1"}, "listen.tls.min_version: "),
    ({"cert_file": "CERT", "key_file": "KEY", "session_tickets": 9}, "listen.tls.session_tickets: "),
    ({"cert_file": "CERT", "key_file": "KEY", "session_tickets": -1}, "listen.tls.session_tickets: "),
])
def test_listener_problems_name_the_key(pki, tls, line):
    paths = {"CERT": str(pki["good"].cert), "KEY": str(pki["good"].key), "OTHER_KEY": str(pki["other"].key),
             "EXPIRED": str(pki["expired"].cert), "EXPIRED_KEY": str(pki["expired"].key)}
    tls = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in tls.items()}
    found = problems_of({"listen": {"tls": tls}})
    assert any(p.startswith(line) for p in found), found


def test_upstream_tls_needs_an_https_url_and_readable_files(pki):
    found = problems_of({"upstream": {"url": "http://127.0.0.1:9", "tls": {"server_name": "coordinator"}}})
    assert any(p.startswith("upstream.tls: ") for p in found), found
    found = problems_of({"upstream": {"url": "https://127.0.0.1:9", "tls": {"ca_file": "/absent-ca.pem"}}})
    assert any(p.startswith("upstream.tls.ca_file: cannot read") for p in found), found


def test_binding_needs_client_certificates():
    found = problems_of({"auth": {"issuers": [{**ISSUER, "require_certificate_binding": True}]}})
    assert any(p.startswith("auth.issuers: require_certificate_binding needs client certificates") for p in found)
