"""User-space instructions per authenticated run start, counted by callgrind: a repeatable figure.

    .venv/bin/python tests/bench/instructions.py                          # this checkout
    .venv/bin/python tests/bench/instructions.py --baseline DIR           # and another `proxy` package
    .venv/bin/python tests/bench/instructions.py --requests 2000 --no-access-log
    .venv/bin/python tests/bench/instructions.py --route get --runs     # GET /v1/runs/{id}, and with
                                                                        # ownership on, side by side
    .venv/bin/python tests/bench/instructions.py --tls                  # plain and over HTTPS, side by side
    .venv/bin/python tests/bench/instructions.py --tls --close          # a new connection (and handshake)
                                                                        # per run start

Timing on a shared 2-core machine moves tens of percent between rounds; an
instruction count does not (about 1-2% between runs here), so it settles
whether a change to the request path made it cheaper. It counts what the
gateway process executes in user space, not the kernel's socket work, so it is
a complement to `bench.py`'s CPU per request, not a replacement.

The gateway runs under `valgrind --tool=callgrind` (about 50x slower) with auth
required and the production defaults, metrics and the access log on (`--no-metrics`,
`--no-access-log` count what each costs); a keep-alive client sends `--warmup` run starts (caches, pooled
connections), the counters are zeroed, `--requests` more are sent, and the
counters are dumped. Everything listens on 127.0.0.1; every wait is bounded.
`--route get` counts `GET /v1/runs/{id}` instead (the stand-in coordinator answers
a Run bound to the bench token's subject). `--runs` counts this checkout twice,
side by side: as configured, then with runs belonging to their callers (the
caller bound into each start, `runs.access: owner`, and an audit file when the
configuration has an `audit` section), and prints the ratio. `--tls` counts this checkout
over HTTPS too (`listen.tls` with a certificate from the test PKI, the client checking it against its
CA), side by side with plain HTTP, and prints the ratio; a `--baseline` is then counted over HTTPS.
`--close` sends every request on a new connection (`Connection: close`), so with `--tls` a count
is a full handshake plus one run start. `--rate-backend local` counts with
`limits.run_start_rate` on (a limit nothing reaches); `--rate-backend redis` counts that twice,
side by side, with `backend: local` and with `backend: redis` (a redis-server on loopback, no
persistence, on the load core), and prints the difference per run start.
Needs valgrind (Debian package valgrind) and nginx (tests/bench/run.sh installs it), and
redis-server for `--rate-backend redis`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402  (the bench's own helpers: same fixtures, same configs)
    BENCH_DIR,
    LOAD_CPU,
    RUN_START_BODY,
    TARGET_CPU,
    BenchError,
    Processes,
    free_port,
    gateway_config,
    nginx_upstream_conf,
    port_open,
    wait_until,
)


RUN_ID = "run_bench"
RUNS_LABEL = "with runs owned (binding, owner access, audit sink %s)"
TLS_LABEL = "this checkout over HTTPS (listen.tls)"
LOCAL_LABEL = "this checkout, backend: local"
NO_LIMIT = {"per_second": 1_000_000, "burst": 1_000_000}  # a run-start limit that is never reached


def send(port: int, token: str, count: int, route: str = "start", tls: ssl.SSLContext | None = None,
         close: bool = False) -> None:
    """`count` run starts (or gets of one run) on one keep-alive connection (over HTTPS with `tls`;
    each on a new connection with `close`); each must succeed. Each request goes out in one write, as
    wrk sends it: http.client writes a head and a body apart, which over TLS would be two records."""
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        return tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls is not None else sock

    lines = [f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {token}"] + (["Connection: close"] if close else [])
    if route == "get":
        raw = "\r\n".join([f"GET /v1/runs/{RUN_ID} HTTP/1.1", *lines, "", ""]).encode()
    else:
        body = RUN_START_BODY.encode()
        raw = "\r\n".join(["POST /v1/runs HTTP/1.1", *lines, "Content-Type: application/json",
                            f"Content-Length: {len(body)}", "", ""]).encode() + body
    sock: socket.socket | None = None
    try:
        for _ in range(count):
            if sock is None:
                sock = connect()
            sock.sendall(raw)
            response = http.client.HTTPResponse(sock)
            response.begin()
            answer = response.read()
            response.close()
            if response.status != 200:
                raise BenchError(f"a {route} answered {response.status}: {answer[:200]!r}")
            if close:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


def client_context(workdir: Path) -> tuple[ssl.SSLContext, dict[str, str]]:
    """A server pair from the test PKI for `listen.tls`, and a client context trusting its CA."""
    from tests.support.certs import Pki
    pki = Pki(workdir / "pki")
    ca = pki.ca("bench-ca")
    server = pki.issue(ca, "localhost")
    context = ssl.create_default_context(cafile=str(ca.cert))
    return context, {"cert_file": str(server.cert), "key_file": str(server.key)}


def upstream_conf(workdir: Path, port: int, issuer: str, subject: str) -> str:
    """The bench's nginx stand-in, which also answers GET /v1/runs/{id} with a Run bound to `subject`."""
    run = json.dumps({"run_id": RUN_ID, "root_node_run_id": "nr_bench", "state": "running",
                      "run_context": {"identity": {"iss": issuer, "sub": subject},
                                      "actor": {"type": "principal", "id": subject}}}, separators=(",", ":"))
    conf = nginx_upstream_conf(workdir, port)
    anchor = "    location = /v1/health"
    return conf.replace(anchor, f"    location /v1/runs/ {{ default_type application/json; return 200 '{run}'; }}\n"
                        + anchor, 1)


def runs_config(workdir: Path, cfg: dict, audit: str = "file") -> dict:
    """`cfg` with runs belonging to their callers: binding, owner access, and the audit trail
    (`audit`: file, stdout or off)."""
    cfg = {**cfg, "runs": {"bind_identity": True, "access": "owner"}}
    if audit != "off" and "audit" in _config_sections():
        cfg["audit"] = {"sink": audit, "path": str(workdir / "audit.log") if audit == "file" else None}
    return cfg


def _config_sections() -> set[str]:
    from proxy.settings.models import GatewayConfig
    return set(GatewayConfig.__dataclass_fields__)


def count(procs: Processes, workdir: Path, label: str, src: Path | None, upstream: str, issuer: str,
          token: str, args: argparse.Namespace, runs: bool = False, tls: ssl.SSLContext | None = None,
          rate: str | None = None, redis_url: str | None = None) -> int:
    """Instructions per request for the `proxy` package in `src` (None: this checkout); `tls`: over
    HTTPS; `rate`: with the run-start limit on, in that backend."""
    port = free_port()
    cfg = gateway_config(port, upstream, issuer, metrics=args.metrics, access_log=args.access_log)
    if tls is not None:
        cfg["listen"]["tls"] = args.tls_files
    if rate is not None:
        cfg["limits"] = {"run_start_rate": {**NO_LIMIT, "backend": rate}}
        if rate == "redis":
            cfg["redis"] = {"url": redis_url}
    if runs:
        cfg = runs_config(workdir, cfg, args.audit)
    path = workdir / f"{label}.yaml"
    path.write_text(json.dumps(cfg))
    # -P: the working directory (this checkout) must not shadow PYTHONPATH's package.
    # "This checkout" is the one this script lives in, whichever checkout the venv installed.
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "HOME": str(workdir),
           "PYTHONPATH": str(src if src is not None else BENCH_DIR.parent.parent)}
    out = workdir / f"callgrind.{label}"
    proc = procs.start(label, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               "--dump-line=no", "--dump-instr=no", sys.executable, "-P", "-m", "proxy", "serve",
                               "--config", str(path)], TARGET_CPU, env=env)
    try:
        wait_until(f"{label} under callgrind", lambda: port_open(port), 240, proc, procs, label, interval=0.5)
        send(port, token, args.warmup, args.route, tls, args.close)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True, timeout=60)
        send(port, token, args.requests, args.route, tls, args.close)
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True, capture_output=True,
                       timeout=60)
        dump = Path(f"{out}.1")
        wait_until("the callgrind dump", dump.exists, 60)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(dump, args.keep / f"callgrind.{label}")
        for line in dump.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1]) // args.requests
        raise BenchError(f"no summary line in {dump}")
    finally:
        procs.stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="directory holding another `proxy` package to count too")
    p.add_argument("--requests", type=int, default=1000, help="counted run starts (default 1000)")
    p.add_argument("--warmup", type=int, default=200, help="uncounted run starts first (default 200)")
    p.add_argument("--keep", type=Path, help="copy each callgrind dump here (read it with callgrind_annotate)")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", help="with metrics disabled")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="with the access log off")
    p.add_argument("--route", choices=("start", "get"), default="start",
                   help="count POST /v1/runs (default) or GET /v1/runs/{id}")
    p.add_argument("--runs", action="store_true", help="also count with runs belonging to their callers "
                   "(binding, owner access, audit file), side by side")
    p.add_argument("--audit", choices=("file", "stdout", "off"), default="file",
                   help="with --runs: the audit sink (default file)")
    p.add_argument("--tls", action="store_true", help="also count this checkout over HTTPS (listen.tls), "
                   "side by side; a --baseline is counted over HTTPS")
    p.add_argument("--close", action="store_true", help="a new connection per request (Connection: close)")
    p.add_argument("--rate-backend", choices=("local", "redis"),
                   help="with the run-start limit on in this backend (redis: and in local, side by side)")
    args = p.parse_args(argv)
    tools = ("valgrind", "callgrind_control", "nginx", "taskset") + (("redis-server",) if args.rate_backend == "redis"
                                                                      else ())
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"instructions.py: {tool} not found", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="arp-instr-"))
    procs = Processes(workdir)
    try:
        issuer_port, upstream_port = free_port(), free_port()
        issuer = f"http://127.0.0.1:{issuer_port}"
        proc = procs.start("issuer", [sys.executable, str(BENCH_DIR / "servers.py"), "issuer",
                                      "--port", str(issuer_port), "--out", str(workdir)], LOAD_CPU)
        wait_until("issuer", lambda: (workdir / "token.txt").exists() and port_open(issuer_port), 20, proc, procs,
                   "issuer")
        conf = workdir / "upstream.conf"
        conf.write_text(upstream_conf(workdir, upstream_port, issuer, "bench"))
        proc = procs.start("upstream", ["nginx", "-c", str(conf), "-p", str(workdir), "-e",
                                        str(workdir / "upstream" / "error.log")], LOAD_CPU)
        wait_until("nginx upstream", lambda: port_open(upstream_port), 10, proc, procs, "upstream")
        token = (workdir / "token.txt").read_text().strip()
        upstream = f"http://127.0.0.1:{upstream_port}"
        redis_url = None
        if args.rate_backend == "redis":
            redis_port = free_port()
            proc = procs.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                         "--dir", str(workdir), "--protected-mode", "no"], LOAD_CPU)
            wait_until("redis", lambda: port_open(redis_port), 10, proc, procs, "redis")
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        started = time.monotonic()
        tls = None
        if args.tls:
            tls, args.tls_files = client_context(workdir)
        rate = args.rate_backend
        counts = {}
        if rate == "redis":
            counts[LOCAL_LABEL] = count(procs, workdir, "local", None, upstream, issuer, token, args, rate="local")
        counts["this checkout"] = count(procs, workdir, "current", None, upstream, issuer, token, args, rate=rate,
                                        redis_url=redis_url)
        if tls is not None:
            counts[TLS_LABEL] = count(procs, workdir, "current_tls", None, upstream, issuer, token, args, tls=tls)
        if args.baseline is not None:
            counts[str(args.baseline)] = count(procs, workdir, "baseline", args.baseline.resolve(), upstream,
                                               issuer, token, args, tls=tls, rate=rate, redis_url=redis_url)
        if args.runs:
            counts[RUNS_LABEL % args.audit] = count(
                procs, workdir, "runs", None, upstream, issuer, token, args, runs=True)
    except BenchError as exc:
        print(f"instructions.py: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    what = "GET /v1/runs/{id}" if args.route == "get" else "POST /v1/runs"
    limit = f", run-start limit in {rate}" if rate else ""
    print(f"user-space instructions per authenticated {what} ({args.requests} counted, "
          f"metrics {'on' if args.metrics else 'off'}, access log {'on' if args.access_log else 'off'}{limit}, "
          f"{'a new connection per request' if args.close else 'keep-alive'}; "
          f"{time.monotonic() - started:.0f} s):")
    for label, n in counts.items():
        print(f"  {label}: {n:,}")
    if args.tls:
        print(f"  over HTTPS / plain: {counts[TLS_LABEL] / counts['this checkout']:.3f}")
    if args.baseline is not None:
        current, baseline = counts[TLS_LABEL if args.tls else "this checkout"], counts[str(args.baseline)]
        print(f"  this checkout / baseline: {current / baseline:.3f}")
    if args.runs:
        current, owned = counts["this checkout"], counts[RUNS_LABEL % args.audit]
        print(f"  with runs owned / as configured: {owned / current:.3f}")
    if rate == "redis":
        current, local = counts["this checkout"], counts[LOCAL_LABEL]
        print(f"  redis - local: {current - local:+,} per run start ({current / local:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
