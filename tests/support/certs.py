"""Certificates for TLS tests, made with the `openssl` command in a temporary directory.

    pki = Pki(tmp_path)
    ca = pki.ca("ca")                                        # a CA: ca.cert, ca.key
    server = pki.issue(ca, "server", dns="localhost", ip="127.0.0.1")
    client = pki.issue(ca, "client", uri="spiffe://example.org/agent", client=True)
    old = pki.issue(ca, "old", expired=True)
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from proxy.util.certificates import thumbprint


@dataclass(frozen=True)
class Pair:
    name: str
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        out = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True)
        return out.stdout

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.der)


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str) -> Pair:
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=self.dir)
        return Pair(name, cert, key)

    def issue(self, ca: Pair, name: str, *, dns: str = "localhost", ip: str = "127.0.0.1", uri: str | None = None,
              client: bool = False, expired: bool = False) -> Pair:
        cert, key, csr = self.dir / f"{name}.crt", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        san = [f"DNS:{dns}", f"IP:{ip}"] + ([f"URI:{uri}"] if uri else [])
        ext.write_text(f"subjectAltName={','.join(san)}\n"
                       f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}\n"
                       "basicConstraints=CA:FALSE\n")
        _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={name}/O=ARP Test", cwd=self.dir)
        if expired:
            self._sign_expired(ca, csr, ext, cert)
        else:
            _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
                 "-out", str(cert), "-extfile", str(ext), "-days", "30", cwd=self.dir)
        return Pair(name, cert, key)

    def _sign_expired(self, ca: Pair, csr: Path, ext: Path, cert: Path) -> None:
        """`openssl x509` (3.0) takes no start date: `openssl ca` does, with a throwaway database."""
        db = self.dir / f"{cert.stem}.db"
        db.mkdir()
        (db / "index.txt").write_text("")
        config = db / "ca.cnf"
        config.write_text(f"[ca]\ndefault_ca=x\n[x]\ndatabase={db}/index.txt\nnew_certs_dir={db}\n"
                          f"serial={db}/serial\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n")
        (db / "serial").write_text("01\n")
        _run("ca", "-batch", "-config", str(config), "-cert", str(ca.cert), "-keyfile", str(ca.key),
             "-in", str(csr), "-out", str(cert), "-extfile", str(ext), "-notext",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", cwd=self.dir)


def install(pair: Pair, directory: Path, *, cert_name: str = "tls.crt", key_name: str = "tls.key") -> None:
    """Puts `pair` at directory/tls.crt and tls.key by rename, as a kubelet's swap is atomic."""
    directory.mkdir(parents=True, exist_ok=True)
    for source, name in ((pair.cert, cert_name), (pair.key, key_name)):
        staging = directory / f".{name}.tmp"
        shutil.copyfile(source, staging)
        staging.replace(directory / name)
