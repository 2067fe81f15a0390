"""User-space instructions per authenticated run start, counted by callgrind: a repeatable figure.

    .venv/bin/python tests/bench/instructions.py                          # this checkout
    .venv/bin/python tests/bench/instructions.py --baseline DIR           # and another `proxy` package
    .venv/bin/python tests/bench/instructions.py --requests 2000 --no-access-log

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
Needs valgrind (Debian package valgrind) and nginx (tests/bench/run.sh installs it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
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


def send(port: int, token: str, count: int) -> None:
    """`count` run starts on one keep-alive connection; each must start a run."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        for _ in range(count):
            conn.request("POST", "/v1/runs", RUN_START_BODY, headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise BenchError(f"a run start answered {response.status}: {body[:200]!r}")
    finally:
        conn.close()


def count(procs: Processes, workdir: Path, label: str, src: Path | None, upstream: str, issuer: str,
          token: str, args: argparse.Namespace) -> int:
    """Instructions per request for the `proxy` package in `src` (None: this checkout)."""
    port = free_port()
    cfg = gateway_config(port, upstream, issuer, metrics=args.metrics, access_log=args.access_log)
    path = workdir / f"{label}.yaml"
    path.write_text(json.dumps(cfg))
    # -P: the working directory (this checkout) must not shadow PYTHONPATH's package.
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "HOME": str(workdir)}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = workdir / f"callgrind.{label}"
    proc = procs.start(label, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               "--dump-line=no", "--dump-instr=no", sys.executable, "-P", "-m", "proxy", "serve",
                               "--config", str(path)], TARGET_CPU, env=env)
    try:
        wait_until(f"{label} under callgrind", lambda: port_open(port), 240, proc, procs, label, interval=0.5)
        send(port, token, args.warmup)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True, timeout=60)
        send(port, token, args.requests)
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
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "nginx", "taskset"):
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
        conf.write_text(nginx_upstream_conf(workdir, upstream_port))
        proc = procs.start("upstream", ["nginx", "-c", str(conf), "-p", str(workdir), "-e",
                                        str(workdir / "upstream" / "error.log")], LOAD_CPU)
        wait_until("nginx upstream", lambda: port_open(upstream_port), 10, proc, procs, "upstream")
        token = (workdir / "token.txt").read_text().strip()
        upstream = f"http://127.0.0.1:{upstream_port}"
        started = time.monotonic()
        counts = {"this checkout": count(procs, workdir, "current", None, upstream, issuer, token, args)}
        if args.baseline is not None:
            counts[str(args.baseline)] = count(procs, workdir, "baseline", args.baseline.resolve(), upstream,
                                               issuer, token, args)
    except BenchError as exc:
        print(f"instructions.py: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"user-space instructions per authenticated POST /v1/runs ({args.requests} counted, "
          f"metrics {'on' if args.metrics else 'off'}, access log {'on' if args.access_log else 'off'}; "
          f"{time.monotonic() - started:.0f} s):")
    for label, n in counts.items():
        print(f"  {label}: {n:,}")
    if len(counts) == 2:
        current, baseline = counts.values()
        print(f"  this checkout / baseline: {current / baseline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
