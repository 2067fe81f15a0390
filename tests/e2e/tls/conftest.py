"""Certificates shared by the TLS tests: made once per module with `openssl` (tests/support/certs.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.certs import Pair, Pki


@dataclass(frozen=True)
class Certs:
    ca: Pair
    other_ca: Pair
    server1: Pair
    server2: Pair
    expired: Pair
    client_a: Pair
    client_b: Pair
    client_other: Pair


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    ca, other_ca = pki.ca("ca"), pki.ca("other-ca")
    return Certs(
        ca=ca, other_ca=other_ca,
        server1=pki.issue(ca, "server1"), server2=pki.issue(ca, "server2"),
        expired=pki.issue(ca, "expired", expired=True),
        client_a=pki.issue(ca, "client-a", uri="spiffe://arp.test/agent-a", client=True),
        client_b=pki.issue(ca, "client-b", uri="spiffe://arp.test/agent-b", client=True),
        client_other=pki.issue(other_ca, "client-other", uri="spiffe://elsewhere/agent", client=True),
    )
