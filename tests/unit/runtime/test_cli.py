"""The command line as a user types it: `check-config PATH`, misuse, `dev --help`, the issuer checks
at load, and a `serve` that loads no dev code. Each runs `python -m proxy` in a child process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.deploy import ROOT
from tests.support.process import free_ports

EXAMPLE = ROOT / "config" / "gateway.example.yaml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})


def config_with_issuer(tmp_path: Path, issuer: str, mode: str = "required") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"auth:\n  mode: {mode}\n  issuers:\n    - issuer: '{issuer}'\n      audiences: [arp-run-gateway]\n")
    return path


def test_check_config_takes_the_path_as_an_argument():
    positional = cli("check-config", str(EXAMPLE))
    assert positional.returncode == 0, positional.stderr
    assert "issuers:" in positional.stdout and positional.stderr == ""
    flag = cli("check-config", "--config", str(EXAMPLE))
    assert flag.returncode == 0 and flag.stdout == positional.stdout


def test_misuse_prints_the_subcommands_usage():
    for args in (["check-config", str(EXAMPLE), "--bogus"],
                 ["check-config", str(EXAMPLE), "--config", str(EXAMPLE)],
                 ["serve", "--config", str(EXAMPLE), "extra-path"]):
        done = cli(*args)
        assert done.returncode == 2 and done.stdout == "", args
        assert done.stderr.startswith(f"usage: arp-gateway {args[0]} "), done.stderr
        assert f"arp-gateway {args[0]}: error: " in done.stderr, done.stderr


def test_dev_help_documents_auth_and_issuer_port():
    done = cli("dev", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--auth {required,optional,disabled} auth.mode: required" in text, text
    assert "optional (default" in text and "disabled (no checks)" in text
    assert "--issuer-port ISSUER_PORT port of the dev token issuer" in text and "default 8089" in text


def test_a_scheme_less_issuer_is_refused_at_load_naming_the_key(tmp_path):
    done = cli("check-config", str(config_with_issuer(tmp_path, "127.0.0.1:8830")))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("config error: auth.issuers[0].issuer: must be an http(s) URL"), done.stderr
    assert "'127.0.0.1:8830'" in done.stderr


def test_plain_http_issuer_off_loopback_warns_in_required_mode_only(tmp_path):
    done = cli("check-config", str(config_with_issuer(tmp_path, "http://idp.example.com/realms/arp")))
    assert done.returncode == 0
    assert done.stderr.startswith("config warning: auth.issuers[0].issuer: http://idp.example.com/realms/arp "
                                  "is plain http://"), done.stderr
    for issuer, mode in (("http://127.0.0.1:8089", "required"), ("http://localhost:8089", "required"),
                         ("http://[::1]:8089", "required"), ("https://idp.example.com", "required"),
                         ("http://idp.example.com", "optional")):
        quiet = cli("check-config", str(config_with_issuer(tmp_path, issuer, mode)))
        assert quiet.returncode == 0 and quiet.stderr == "", (issuer, mode, quiet.stderr)


async def test_serve_loads_no_dev_code_and_logs_the_issuer_warning(tmp_path):
    """`-X importtime` lists every module the serving process imported, on stderr."""
    port, metrics = free_ports(2)
    config = tmp_path / "gateway.yaml"
    # 192.0.2.1 (TEST-NET-1) never answers: the keys stay unloaded, which does not stop serving.
    config.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\nmetrics: {{host: 127.0.0.1, port: {metrics}}}\n"
                      "auth:\n  issuers: [{issuer: 'http://192.0.2.1/realms/arp', audiences: [a]}]\n"
                      "  jwks_fetch_timeout_s: 0.5\ndrain_delay_s: 0\nshutdown_grace_s: 1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", "-m", "proxy", "serve", "--config", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    lines: list[dict] = []
    try:
        async with asyncio.timeout(30):
            while not any(entry.get("msg") == "gateway listening" for entry in lines):
                line = await proc.stdout.readline()
                assert line, "serve exited early"
                if line.startswith(b"{"):
                    lines.append(json.loads(line))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.decode().splitlines()
                if line.startswith("import time:")}
    assert "proxy.runtime.server" in imported and "proxy.auth.jwks_refresh" in imported  # the list is complete
    assert sorted(m for m in imported if m == "proxy.dev" or m.startswith("proxy.dev.")) == []
    warnings = [e for e in lines if e.get("level") == "warning" and e.get("event") == "config_warning"]
    assert len(warnings) == 1 and "auth.issuers[0].issuer: http://192.0.2.1/realms/arp is plain http://" \
        in warnings[0]["msg"], lines
