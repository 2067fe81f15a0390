"""TLS scenario: the gateway with `listen.tls` beside HAProxy with `ssl crt`, both checking the RS256
token as in bench.py's throughput section (HAProxy with jwt_verify).

    .venv/bin/python tests/bench/tls.py                 # 5 back-to-back pairs x 3 s per mode
    .venv/bin/python tests/bench/tls.py --pairs 2 --duration 2

Two modes, each in back-to-back pairs alternating which target goes first (the median pair ratio is
the verdict, as bench.py's close comparisons):
  keep-alive       wrk -c32 over kept-alive HTTPS connections: authenticated run starts per second
  new connections  the same with `Connection: close`: every request is a new TCP connection and a full
                   TLS handshake (wrk resumes no session), so requests per second = handshakes per second
The layout is bench.py's: each target pinned to core 0, wrk, the upstream and the issuer on core 1.
Results: tests/bench/results/tls.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench
from bench import LOAD_CPU, RESULTS_DIR, TARGET_CPU, Bench, BenchError, free_port, port_open, wait_until

from tests.support.certs import Pki

CLOSE_SCRIPT = "wrk.headers[\"Connection\"] = \"close\"\n"


def haproxy_tls_conf(port: int, upstream_port: int, issuer: str, pubkey: Path, pem: Path) -> str:
    conf = bench.haproxy_conf(port, upstream_port, issuer, pubkey)
    # One certificate, ALPN http/1.1 and TLS 1.2 at least: what the gateway offers by default.
    return conf.replace(f"  bind 127.0.0.1:{port}\n",
                        f"  bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1 ssl-min-ver TLSv1.2\n")


def curl_status(url: str, ca: Path, token: str | None) -> tuple[int, str]:
    argv = ["curl", "-sS", "--max-time", "5", "--cacert", str(ca), "-o", "-", "-w", "\n%{http_code}",
            "-X", "POST", "-H", "Content-Type: application/json", "--data", bench.RUN_START_BODY, url]
    if token:
        argv[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


class TlsBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.base = Bench(argparse.Namespace(), workdir)   # the issuer, the upstream, wrk and the processes
        self.procs = self.base.procs
        self.results: dict[str, Any] = {"pairs": args.pairs, "duration_s": args.duration, "modes": {}}

    def certificates(self) -> tuple[Path, Path, Path]:
        pki = Pki(self.workdir / "pki")
        ca = pki.ca("bench-ca")
        server = pki.issue(ca, "localhost")
        pem = self.workdir / "haproxy.pem"
        pem.write_bytes(server.cert.read_bytes() + server.key.read_bytes())
        return ca.cert, server.cert, server.key

    def start(self) -> dict[str, str]:
        self.base.start_fixture()
        ca, cert, key = self.certificates()
        self.ca = ca
        upstream = f"http://127.0.0.1:{self.base.ports['upstream']}"
        ports = {"gateway": free_port(), "haproxy": free_port()}
        cfg = bench.gateway_config(ports["gateway"], upstream, self.base.issuer)
        cfg["listen"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
        gw = self.base.start_gateway("gw_tls", cfg, TARGET_CPU)
        wait_until("gateway", lambda: port_open(ports["gateway"]), 20, gw, self.procs, "gw_tls")
        conf = self.workdir / "haproxy-tls.cfg"
        conf.write_text(haproxy_tls_conf(ports["haproxy"], self.base.ports["upstream"], self.base.issuer,
                                         self.workdir / "pubkey.pem", self.workdir / "haproxy.pem"))
        check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError("haproxy rejected the TLS config: " + check.stderr.strip()[-300:])
        ha = self.procs.start("haproxy-tls", ["haproxy", "-db", "-f", str(conf)], TARGET_CPU)
        wait_until("haproxy", lambda: port_open(ports["haproxy"]), 10, ha, self.procs, "haproxy-tls")
        self.pids = {"gateway": gw.pid, "haproxy": ha.pid}
        urls = {name: f"https://localhost:{port}/v1/runs" for name, port in ports.items()}
        for name, url in urls.items():
            # The JWKS may still be loading: the gateway answers 503 until it is.
            wait_until(f"{name} preflight", lambda url=url: curl_status(url, ca, self.base.token)[0] in (200, 201),
                       20)
            status, body = curl_status(url, ca, self.base.token)
            if "run_bench" not in body:
                raise BenchError(f"{name}: preflight answered {status}: {body[:200]}")
            status, _ = curl_status(url, ca, None)
            if status != 401:
                raise BenchError(f"{name}: a run start without a token got {status}, not 401")
        return urls

    def wrk(self, url: str, pid: int, close: bool) -> dict[str, Any]:
        script = self.workdir / ("close.lua" if close else "post.lua")
        if close and not script.exists():
            script.write_text((self.workdir / "post.lua").read_text() + CLOSE_SCRIPT)
        before = bench.cpu_seconds(pid)
        out = self.procs.run("wrk", ["wrk", "-t1", "-c32", f"-d{self.args.duration}s", "--timeout", "5s",
                                     "-s", str(script), url], LOAD_CPU, timeout=self.args.duration + 30)
        used = bench.cpu_seconds(pid) - before
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
        if line is None:
            raise BenchError(f"wrk printed no summary: {out[-300:]!r}")
        raw = json.loads(line.removeprefix("BENCHJSON "))
        errors = raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
        return {"rps": raw["requests"] / (raw["duration_us"] / 1e6), "requests": raw["requests"],
                "errors": errors, "p99_ms": raw["p99_us"] / 1000,
                "cpu_us_per_req": used * 1e6 / raw["requests"] if raw["requests"] else None}

    def run(self, urls: dict[str, str]) -> None:
        for mode, close in (("keep_alive", False), ("new_connections", True)):
            rounds: list[dict[str, Any]] = []
            for i in range(self.args.pairs):
                order = ("gateway", "haproxy") if i % 2 == 0 else ("haproxy", "gateway")
                pair = {name: self.wrk(urls[name], self.pids[name], close) for name in order}
                rounds.append(pair)
                print(f"{mode:16s} pair {i + 1}: gateway {pair['gateway']['rps']:8.0f}/s "
                      f"({pair['gateway']['errors']} errors)  haproxy {pair['haproxy']['rps']:8.0f}/s "
                      f"({pair['haproxy']['errors']} errors)  ratio {pair['gateway']['rps'] / pair['haproxy']['rps']:.2f}",
                      flush=True)
            med = {name: statistics.median(r[name]["rps"] for r in rounds) for name in ("gateway", "haproxy")}
            cpu = {name: statistics.median(r[name]["cpu_us_per_req"] or 0 for r in rounds)
                   for name in ("gateway", "haproxy")}
            self.results["modes"][mode] = {
                "rounds": rounds, "median_rps": med, "median_cpu_us_per_req": cpu,
                "median_pair_ratio": statistics.median(r["gateway"]["rps"] / r["haproxy"]["rps"] for r in rounds),
                "errors": {name: sum(r[name]["errors"] for r in rounds) for name in ("gateway", "haproxy")}}


def render(results: dict[str, Any]) -> str:
    lines = ["# TLS: the gateway with listen.tls beside HAProxy with ssl crt", "",
             f"{results['date']}; {results['pairs']} back-to-back pairs x {results['duration_s']} s per mode, "
             "wrk -t1 -c32, RS256 bearer token checked by both, target on core 0 and load on core 1.", "",
             "| mode | gateway req/s | HAProxy req/s | gateway / HAProxy (median pair) | CPU µs/req gateway | "
             "CPU µs/req HAProxy | errors gateway / HAProxy |", "|---|---|---|---|---|---|---|"]
    for mode, label in (("keep_alive", "keep-alive run starts"),
                        ("new_connections", "new connection per request (= handshakes/s)")):
        m = results["modes"].get(mode)
        if m is None:
            continue
        lines.append(f"| {label} | {m['median_rps']['gateway']:.0f} | {m['median_rps']['haproxy']:.0f} | "
                     f"{m['median_pair_ratio']:.2f} | {m['median_cpu_us_per_req']['gateway']:.0f} | "
                     f"{m['median_cpu_us_per_req']['haproxy']:.0f} | {m['errors']['gateway']} / "
                     f"{m['errors']['haproxy']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="back-to-back pairs per mode (default 5)")
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk round (default 3)")
    args = p.parse_args(argv)
    for tool in ("wrk", "haproxy", "nginx", "taskset", "curl", "openssl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"tls.py: {tool} not found; run tests/bench/run.sh once, which installs it", file=sys.stderr)
            return 2
    bench.os.environ["PATH"] += ":/usr/sbin"
    bench.os.sched_setaffinity(0, {int(LOAD_CPU)})
    workdir = Path(tempfile.mkdtemp(prefix="arp-bench-tls-"))
    run = TlsBench(args, workdir)
    run.results["date"] = bench.datetime.now(bench.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        run.run(run.start())
    except BenchError as exc:
        print(f"tls.py: {exc}", file=sys.stderr)
        return 1
    finally:
        run.procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "tls.json").write_text(json.dumps(run.results, indent=1) + "\n")
    (RESULTS_DIR / "tls.md").write_text(render(run.results))
    print(render(run.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
