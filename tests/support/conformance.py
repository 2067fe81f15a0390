"""Run the unmodified ``arp-conformance`` 0.3.7 CLI, with a fix for a Python URL-join bug.

Why this module exists
----------------------
arp-conformance 0.3.7 registers every spec schema under an ``arp://spec/v1/...`` URI
(``arp_conformance.schemas._to_uri``). The schemas use relative ``$ref`` values such as
``"status.schema.json"`` or ``"../common/extensions.schema.json"``. ``referencing``
resolves them with ``urllib.parse.urljoin``, which only resolves relative references for
schemes listed in ``urllib.parse.uses_relative``. ``arp`` is not listed there, so
``urljoin("arp://spec/v1/schemas/common/health.schema.json", "status.schema.json")``
returns just ``"status.schema.json"``. The first schema check therefore fails, and the run
stops with a single result::

    FAIL runner.exception: _WrappedReferencingError: Unresolvable: status.schema.json

This module adds ``"arp"`` to ``urllib.parse.uses_relative`` and ``uses_netloc``. It changes
those lists only in the process it runs in. It then calls ``arp_conformance.cli.main(argv)``
as is. The installed package is not patched, and no check is skipped or changed.

Command line (from the repository root, so that ``tests.support`` can be imported)::

    .venv/bin/python -m tests.support.conformance check run-gateway \
        --url http://127.0.0.1:PORT --tier surface \
        [--headers 'Authorization=Bearer eyJ...'] [--headers-file FILE] \
        [--strict] [--format text|json|junit] [--out FILE]

The arguments are the same as for the ``arp-conformance`` console script (see
``arp_conformance/cli.py``). The exit code is the CLI's own: 0 when no check FAILed
(with ``--strict``, no check may be WARN or SKIP either), 1 otherwise, and 2 for usage
errors (from argparse).

How a test should call it
-------------------------
Use :func:`run_conformance` (async). It runs the
wrapper in a **separate Python process**, for two reasons. The runner is synchronous (it
uses a blocking ``httpx.Client``), so calling it inside the pytest event loop would
deadlock against a gateway served on that same loop. And the ``urllib.parse`` change stays
out of the pytest process. The helper writes the headers to a ``--headers-file`` (so
tokens are not put in argv) and asks for ``--format json --out <tmpfile>``. It then parses
that JSON report::

    from tests.support.conformance import run_conformance

    async def test_gateway_conformance(gateway_url, idp):
        token = await idp.token({"sub": "conformance", "aud": "arp-gateway"})
        result = await run_conformance(
            gateway_url, tier="surface", headers={"Authorization": f"Bearer {token}"}
        )
        assert result.ok, result.summary()          # every check PASSed (strict)
        # Surface tier accepts any 4xx/5xx with a valid ErrorEnvelope, so a gateway
        # that answers 401 to everything would still pass. Assert the status codes too:
        assert 401 not in result.status_codes(), result.summary()

Report shape (``result.report``, which comes from ``ConformanceReport.to_dict()``)::

    {"service": "run-gateway", "tier": "surface", "spec_ref": "spec/v1@v0.3.7",
     "counts": {"PASS": 7, "FAIL": 0, "WARN": 0, "SKIP": 0}, "ok": true,
     "results": [{"check_id": "smoke.health", "name": "GET /v1/health",
                  "status": "PASS"|"FAIL"|"WARN"|"SKIP", "message": "...",
                  "errors": ["$.status: 'x' is not one of [...]"], "duration_ms": 3,
                  "exchange": {"method": "GET", "url": "...", "request_body": null,
                               "status_code": 200, "content_type": "application/json",
                               "response_body": {...}}}, ...]}

For run-gateway, the surface tier has 7 checks: ``smoke.health``, ``smoke.version``, then
``surface.01`` to ``surface.05``. These cover GET /v1/health, GET /v1/version,
POST /v1/runs (with an intentionally invalid ``{}`` body that must be rejected with an
ErrorEnvelope), GET /v1/runs/{random id} and POST /v1/runs/{random id}:cancel. A check
gives WARN instead of PASS when the Content-Type is not ``application/json``.
The ``core`` and ``deep`` tiers only add a SKIP ("not implemented"), and they require
``--allow-mutations``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.process import ROOT as REPO_ROOT

__all__ = [
    "ConformanceResult",
    "enable_arp_uri_scheme",
    "main",
    "run_conformance",
]


def enable_arp_uri_scheme() -> None:
    """Make ``urllib.parse.urljoin`` resolve relative references against ``arp://`` URIs."""
    for registry in (urllib.parse.uses_relative, urllib.parse.uses_netloc):
        if "arp" not in registry:
            registry.append("arp")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``arp_conformance.cli.main`` with the ``arp://`` fix. Returns the CLI's exit code."""
    enable_arp_uri_scheme()
    from arp_conformance.cli import main as cli_main

    return cli_main(list(sys.argv[1:] if argv is None else argv))


# --------------------------------------------------------------------------- helpers


@dataclass
class ConformanceResult:
    """Result of one wrapper run. Parsed from the CLI's ``--format json`` report."""

    returncode: int
    report: dict[str, Any]
    argv: list[str]
    stdout: str = ""
    stderr: str = ""
    strict: bool = True
    results: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.results = list(self.report.get("results") or [])

    @property
    def ok(self) -> bool:
        """True if the CLI exited 0 and, when strict, every check PASSed (and at least one ran)."""
        if self.returncode != 0 or not self.results:
            return False
        if self.strict:
            return all(r.get("status") == "PASS" for r in self.results)
        return all(r.get("status") != "FAIL" for r in self.results)

    @property
    def not_passed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("status") != "PASS"]

    @property
    def check_ids(self) -> list[str]:
        return [r["check_id"] for r in self.results]

    def status_codes(self) -> list[int | None]:
        return [(r.get("exchange") or {}).get("status_code") for r in self.results]

    def summary(self) -> str:
        """Readable text for assertion messages: every check, with details for the ones that did not PASS."""
        lines = [
            f"arp-conformance exit={self.returncode} counts={self.report.get('counts')} "
            f"service={self.report.get('service')} tier={self.report.get('tier')}"
        ]
        for r in self.results:
            ex = r.get("exchange") or {}
            where = f" [{ex.get('method')} {ex.get('url')} -> {ex.get('status_code')}]" if ex else ""
            lines.append(f"  {r.get('status'):4} {r.get('check_id')} {r.get('name')}: {r.get('message')}{where}")
            if r.get("status") != "PASS":
                for err in r.get("errors") or []:
                    lines.append(f"        - {err}")
                if ex.get("response_body") is not None:
                    lines.append(f"        response_body: {json.dumps(ex['response_body'])[:500]}")
        if self.stderr.strip():
            lines.append("stderr:\n" + self.stderr.strip()[-4000:])
        return "\n".join(lines)


def _build_argv(
    url: str,
    *,
    service: str,
    tier: str,
    headers_file: Path | None,
    out_file: Path,
    strict: bool,
    timeout: float,
    extra_args: Sequence[str],
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "tests.support.conformance",
        "check",
        service,
        "--url",
        url,
        "--tier",
        tier,
        "--timeout",
        str(timeout),
        "--format",
        "json",
        "--out",
        str(out_file),
    ]
    if headers_file is not None:
        argv += ["--headers-file", str(headers_file)]
    if strict:
        argv.append("--strict")
    argv += list(extra_args)
    return argv


def _write_headers(tmp: Path, headers: Mapping[str, str] | None) -> Path | None:
    if not headers:
        return None
    lines = []
    for key, value in headers.items():
        if "=" in key or "\n" in key or "\n" in value:
            raise ValueError(f"header not representable in a KEY=VALUE file: {key!r}")
        lines.append(f"{key}={value}")
    path = tmp / "headers.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _load_result(argv: list[str], rc: int, out_file: Path, stdout: str, stderr: str, strict: bool) -> ConformanceResult:
    try:
        report = json.loads(out_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"arp-conformance produced no JSON report (exit {rc}, {exc.__class__.__name__}: {exc})\n"
            f"argv: {argv}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ) from None
    return ConformanceResult(returncode=rc, report=report, argv=argv, stdout=stdout, stderr=stderr, strict=strict)


async def run_conformance(
    url: str,
    *,
    service: str = "run-gateway",
    tier: str = "surface",
    headers: Mapping[str, str] | None = None,
    strict: bool = True,
    timeout: float = 10.0,
    process_timeout: float = 180.0,
    extra_args: Sequence[str] = (),
) -> ConformanceResult:
    """Run the wrapper in a child process without blocking the event loop, and return the parsed report.

    ``strict=True`` passes ``--strict``: WARN/SKIP count as failures, both in the exit code and in
    :attr:`ConformanceResult.ok`. ``timeout`` is the CLI's per-request timeout.
    ``process_timeout`` limits the whole run; if it runs out, the child is killed and TimeoutError is raised.
    """
    with tempfile.TemporaryDirectory(prefix="arp-conformance-") as tmpdir:
        tmp = Path(tmpdir)
        out_file = tmp / "report.json"
        argv = _build_argv(
            url,
            service=service,
            tier=tier,
            headers_file=_write_headers(tmp, headers),
            out_file=out_file,
            strict=strict,
            timeout=timeout,
            extra_args=extra_args,
        )
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(REPO_ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), process_timeout)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        assert proc.returncode is not None
        return _load_result(
            argv, proc.returncode, out_file, out.decode(errors="replace"), err.decode(errors="replace"), strict
        )


if __name__ == "__main__":
    raise SystemExit(main())
