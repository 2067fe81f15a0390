"""CertificateFiles: a changed pair is loaded, a bad one refused with the old context kept, each
counted once per change; a failing check does not stop the periodic reload."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest

from proxy.edge.tls import CertificateFiles, ServerTls, handshake_reason
from proxy.util.certificates import TlsFiles, build_context
from tests.support.certs import Pair, Pki, install


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def watched(directory: Path, interval: float = 60) -> tuple[CertificateFiles, list[str]]:
    results: list[str] = []
    files = CertificateFiles("listen", TlsFiles(str(directory / "tls.crt"), str(directory / "tls.key")),
                             lambda f: build_context(f, server=True), reload_interval_s=interval,
                             on_reload=lambda result, _not_after: results.append(result))
    return files, results


def test_a_bad_new_pair_keeps_the_old_context(pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = pki.ca("edge-ca")
    one, two = pki.issue(ca, "one"), pki.issue(ca, "two")
    install(one, tmp_path)
    files, results = watched(tmp_path)
    first = files.context
    assert files.check() is False and results == []           # nothing changed
    install(Pair("mix", two.cert, one.key), tmp_path)
    with caplog.at_level(logging.ERROR, logger="proxy.edge.tls"):
        assert files.check() is False
        assert files.check() is False                          # the same bad files: one failure, not two
    assert files.context is first and results == ["failure"]
    assert [r.key for r in caplog.records] == ["key_file"]     # type: ignore[attr-defined]
    install(two, tmp_path)
    assert files.check() is True and files.context is not first and results == ["failure", "success"]
    assert files.check(force=True) is True                     # SIGHUP reloads even unchanged files


async def test_the_periodic_check_survives_a_failing_pass(pki: Pki, tmp_path: Path) -> None:
    ca = pki.ca("sweep-ca")
    one, two = pki.issue(ca, "s-one"), pki.issue(ca, "s-two")
    install(one, tmp_path)
    files, results = watched(tmp_path, interval=0.02)
    calls = 0

    def flaky(_result: str, _not_after: float | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a metrics sink broke")
        results.append(_result)

    files.on_reload = flaky
    files.watch(asyncio.get_running_loop())
    try:
        install(two, tmp_path)
        await asyncio.sleep(0.1)
        install(one, tmp_path)
        for _ in range(100):
            if results:
                break
            await asyncio.sleep(0.02)
        assert results == ["success"]
    finally:
        files.stop()


def test_new_contexts_of_the_listener_keep_its_sni_callback(pki: Pki, tmp_path: Path) -> None:
    ca = pki.ca("sni-ca")
    one, two = pki.issue(ca, "n-one"), pki.issue(ca, "n-two")
    install(one, tmp_path)
    files, _ = watched(tmp_path)
    tls = ServerTls(files)
    install(two, tmp_path)
    assert files.check()
    assert files.context.sni_callback is not None and files.context.sslobject_class is tls.object_class


@pytest.mark.parametrize("code, reason", [
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"), ("CERTIFICATE_VERIFY_FAILED", "bad_certificate"),
    ("UNSUPPORTED_PROTOCOL", "protocol_version"), ("HTTP_REQUEST", "plain_http"),
    ("TLSV1_ALERT_UNKNOWN_CA", "client_alert"), ("SOMETHING_NEW", "other"), (None, "other")])
def test_handshake_reasons_are_a_bounded_set(code: str | None, reason: str) -> None:
    exc = ssl.SSLError(1, "x")
    exc.reason = code  # type: ignore[misc]
    assert handshake_reason(exc) == reason
