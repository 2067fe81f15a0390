"""The one loader of certificate material: what it refuses (naming the file at fault), what it
reads from a client certificate, and the file identity that reloads follow."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from proxy.util.certificates import CertificateProblem, TlsFiles, build_context, files_stamp, peer_certificate
from tests.support.certs import Pki, install


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca(pki: Pki):
    return pki.ca("unit-ca")


def test_a_good_pair_gives_a_context_and_its_expiry(pki: Pki, ca) -> None:
    pair = pki.issue(ca, "good")
    built = build_context(TlsFiles(str(pair.cert), str(pair.key), str(ca.cert)), server=True, client_auth="required")
    assert built.context.verify_mode == ssl.CERT_REQUIRED
    assert built.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert built.not_after is not None


@pytest.mark.parametrize("case, key, words", [
    ("expired", "cert_file", "expired at 2020-01-02"),
    ("mismatch", "key_file", "does not match the certificate"),
    ("missing_key", "key_file", "No such file"),
    ("not_pem", "cert_file", "holds no PEM certificate"),
    ("bad_ca", "ca_file", "holds no PEM certificate"),
])
def test_a_bad_pair_names_the_file(pki: Pki, ca, tmp_path: Path, case: str, key: str, words: str) -> None:
    good = pki.issue(ca, f"good-{case}")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    files = {
        "expired": lambda: (lambda p: TlsFiles(str(p.cert), str(p.key)))(pki.issue(ca, "old", expired=True)),
        "mismatch": lambda: TlsFiles(str(good.cert), str(pki.issue(ca, "other").key)),
        "missing_key": lambda: TlsFiles(str(good.cert), str(tmp_path / "absent.key")),
        "not_pem": lambda: TlsFiles(str(junk), str(good.key)),
        "bad_ca": lambda: TlsFiles(str(good.cert), str(good.key), str(junk)),
    }[case]()
    with pytest.raises(CertificateProblem) as caught:
        build_context(files, server=True)
    assert caught.value.key == key
    assert words in caught.value.reason
    assert "BEGIN" not in caught.value.reason   # never the file's content


def test_the_stamp_follows_a_kubelet_symlink_swap(pki: Pki, ca, tmp_path: Path) -> None:
    first, second = pki.issue(ca, "first"), pki.issue(ca, "second")
    install(first, tmp_path / "..v1")
    install(second, tmp_path / "..v2")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "tls.crt").symlink_to("..data/tls.crt")
    files = TlsFiles(str(tmp_path / "tls.crt"))
    before = files_stamp(files)
    assert files_stamp(files) == before
    (tmp_path / "..tmp").symlink_to("..v2")
    (tmp_path / "..tmp").replace(tmp_path / "..data")
    assert files_stamp(files) != before


def test_peer_certificate_reads_subject_uris_and_thumbprint(pki: Pki, ca) -> None:
    client = pki.issue(ca, "agent", uri="spiffe://arp.test/agent", client=True)

    class Handshaken:
        def getpeercert(self, binary_form: bool = False) -> bytes:
            assert binary_form
            return client.der

    seen = peer_certificate(Handshaken())  # type: ignore[arg-type]
    assert seen is not None
    assert seen.uris == ("spiffe://arp.test/agent",)
    assert seen.subject == "O=ARP Test,CN=agent"
    assert seen.thumbprint == client.thumbprint and len(seen.thumbprint) == 43 and "=" not in seen.thumbprint
    assert peer_certificate(None) is None


def _handshake_and_read(server_ctx: ssl.SSLContext, ca_file: str) -> ssl.SSLObject:
    """A client that completes a handshake with `server_ctx` and reads one answer (TLS 1.3 tickets come
    after the handshake, ahead of the first application data)."""
    client_ctx = ssl.create_default_context(cafile=ca_file)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(4):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    server.write(b"answer")
    c_in.write(s_out.read())
    assert client.read(64) == b"answer"
    return client


@pytest.mark.parametrize("tickets, resumable", [(None, True), (0, False)])
def test_a_server_context_sends_the_session_tickets_asked_for(pki: Pki, ca, tickets: int | None,
                                                               resumable: bool) -> None:
    pair = pki.issue(ca, f"tickets-{tickets}")
    extra = {} if tickets is None else {"session_tickets": tickets}
    built = build_context(TlsFiles(str(pair.cert), str(pair.key)), server=True, **extra)
    client = _handshake_and_read(built.context, str(ca.cert))
    assert client.version() == "TLSv1.3"
    assert client.session is not None and client.session.has_ticket is resumable
