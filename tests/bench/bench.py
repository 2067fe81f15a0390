"""Side-by-side benchmark: the ARP Run Gateway against nginx, HAProxy and the JARVIS Run Gateway.

Run it through tests/bench/run.sh (it installs the tools), or directly with the
project venv's python once they are there:

    .venv/bin/python tests/bench/bench.py            # 3 interleaved rounds x 5 s, 1 GiB stream
    .venv/bin/python tests/bench/bench.py --quick    # CI smoke: 1 round x 2 s, 32 MiB stream

Layout on a 2-core machine: the proxy under test is pinned to core 0; the load
generator (wrk or clients.py), the static upstream, the issuer and this
orchestrator share core 1, so the target never competes with its own load.
Everything listens on 127.0.0.1 only. Every process started here runs in its
own process group and is stopped in a `finally`, also on Ctrl-C or SIGTERM.

Sections, in order:
  throughput   wrk -t1 -c32 POST /v1/runs with an RS256 bearer token: req/s, p50, p99 and
               CPU µs/request of the target process, medians over interleaved rounds
  profile      py-spy on the authenticated gateway during one extra (uncounted) load round
  fixed rate   open-loop 1,000 req/s (Debian has no wrk2): latency the proxy adds over direct
  start-up     spawn of `arp-gateway serve` to /readyz 200 with the JWKS fetched
  streaming    NDJSON byte rate and RSS growth, per-line latency, 1,000 open streams
Results: tests/bench/results/latest.md and latest.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
sys.path.insert(0, str(REPO))

VENV_BIN = Path(sys.executable).parent
GATEWAY_BIN = VENV_BIN / "arp-gateway"
PYSPY_BIN = VENV_BIN / "py-spy"
JARVIS_PY = BENCH_DIR / ".venv-jarvis" / "bin" / "python"
# BENCH_RESULTS_DIR lets the CI smoke write elsewhere, so it never overwrites the committed report.
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or BENCH_DIR / "results")

TARGET_CPU = "0"       # the proxy under test
LOAD_CPU = "1"         # wrk, clients, upstreams, issuer, this script
BOTH_CPUS = "0,1"      # the 2-worker gateway (and so it shares a core with the load)

AUDIENCE = "arp-run-gateway"
PAIR_S = 2             # seconds per round of the back-to-back pairs
SCALING_ROUND_S = 3    # seconds per round of the worker-scaling pairs
SCALING_SHARE = 0.4   # of a core per worker in the scaling section: room left for the load
NOISY_PCT = 10         # a round where other processes took this much of core 0 is flagged in the report
RUN_JSON = '{"run_id":"run_bench","root_node_run_id":"nr_bench","state":"queued"}'
RUN_START_BODY = '{"root_node_type_ref": {"node_type_id": "bench", "version": "1"}, "input": {}}'
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = 1024


class BenchError(Exception):
    """A step that makes one target or section unmeasurable; reported as n/a, never faked."""


# =========================================================================== processes


class Processes:
    """Starts pinned processes in their own process groups and guarantees they are stopped."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], cpus: str, env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        # setpriv --pdeathsig: if this script is killed outright (kill -9), where no `finally`
        # runs, the kernel still sends the child SIGTERM. It survives the exec into taskset
        # and from there into the command.
        guard = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        proc = subprocess.Popen([*guard, "taskset", "-c", cpus, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else log, stderr=log,
                                start_new_session=True)  # own group: killpg reaches its children too
        log.close()
        self.running.append((name, proc))
        return proc

    def run(self, name: str, argv: list[str], cpus: str, timeout: float,
            env: dict[str, str] | None = None) -> str:
        """Runs to completion (bounded by `timeout`) and returns stdout."""
        proc = self.start(name, argv, cpus, env, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} did not finish within {timeout:.0f}s") from None
        finally:
            self.stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"{name} exited {proc.returncode}: {self.tail(name)}")
        return out.decode(errors="replace")

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        else:  # the leader is gone; a forked worker may still hold the group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.running = [(n, p) for n, p in self.running if p is not proc]
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop_named(self, names: set[str]) -> None:
        for name, proc in list(self.running):
            if name in names:
                self.stop(proc)

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep going: every other process must still be stopped
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)

    def tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    """An unused loopback port. The tiny race until the server binds is acceptable here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
               procs: Processes | None = None, name: str = "", interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited {proc.returncode}: {procs.tail(name) if procs else ''}")
        try:
            if check():
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(interval)
    raise BenchError(f"{what}: not ready after {timeout:.0f}s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_call(method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request(method, "/" + rest, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# =========================================================================== /proc sampling


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()  # comm may hold spaces; fields start at `state`


def process_tree(root: int) -> list[int]:
    """root and all its live descendants (multi-worker gateways fork)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus cutime+cstime (children already reaped count too)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            f = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def core_ticks(core: int) -> tuple[int, int]:
    """(busy, steal) clock ticks of one core since boot, from /proc/stat.

    busy is user+nice+system only: irq/softirq time is mostly the kernel moving the
    target's own packets, which would otherwise show up as someone else's load.
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, line.split()[1:9])
                return user + nice + system, steal
    raise BenchError(f"no cpu{core} line in /proc/stat")


def rss_mib(root: int) -> float:
    total_kib = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kib / 1024


class RssSampler:
    """Samples a process tree's RSS every `interval` seconds in a thread: before, peak, after."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.before = rss_mib(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def after(self, settle: float = 1.0) -> float:
        time.sleep(settle)
        return rss_mib(self.pid)


# =========================================================================== configs


class CpuBudget:
    """A CFS quota of `share` of one core for the processes put in it: a cgroup of its own, under
    cgroup v2 where the cpu controller is delegated, else under v1's cpu hierarchy. Needs root.

        budget = CpuBudget("arp-bench-w0", 0.4)
        budget.add(pid)
        ...
        budget.remove()   # after its processes have exited
    """

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")
    PERIOD_US = 10_000  # short periods: throttling stalls a worker for at most a few ms at a time

    def __init__(self, name: str, share: float) -> None:
        quota = int(share * self.PERIOD_US)
        if (self.V1 / "cpu.cfs_quota_us").exists():
            self.path = self.V1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        elif "cpu" in (self.V2 / "cgroup.controllers").read_text().split():
            (self.V2 / "cgroup.subtree_control").write_text("+cpu")
            self.path = self.V2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            raise OSError("no cgroup cpu controller to set a CPU quota with")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_s(self) -> float:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("throttled_time", "throttled_usec"):
                return int(value) / (1e9 if key == "throttled_time" else 1e6)
        return 0.0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def nginx_common(workdir: Path, name: str) -> str:
    # master_process off: one process, so its CPU time is the whole server's;
    # every path nginx would otherwise take from /var/lib or /var/log is ours.
    d = workdir / name
    d.mkdir(exist_ok=True)
    return f"""
worker_processes 1;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
"""


def nginx_http_common(workdir: Path, name: str) -> str:
    d = workdir / name
    return f"""
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
"""


def nginx_upstream_conf(workdir: Path, port: int) -> str:
    """The static Run Coordinator stand-in: every POST /v1/runs gets the same Run."""
    return nginx_common(workdir, "upstream") + f"""
http {{
{nginx_http_common(workdir, "upstream")}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /v1/runs {{ default_type application/json; return 200 '{RUN_JSON}'; }}
    location = /v1/health {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
  }}
}}
"""


def nginx_proxy_conf(workdir: Path, port: int, upstream_port: int, stream_port: int) -> str:
    """nginx as a plain reverse proxy: keep-alive pool to the upstream, no auth, no buffering on streams."""
    return nginx_common(workdir, "nginx-proxy") + f"""
http {{
{nginx_http_common(workdir, "nginx-proxy")}
  upstream runs {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}
  upstream events {{ server 127.0.0.1:{stream_port}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://runs;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location ~ ^/v1/runs/[^/]+/events$ {{
      proxy_pass http://events;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;          # each chunk goes out as it arrives, like the gateway
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def haproxy_conf(port: int, upstream_port: int, issuer: str, pubkey: Path) -> str:
    """HAProxy checking what the gateway checks: RS256 signature, iss, aud, exp."""
    return f"""
global
  nbthread 1                 # one core, like the single-process gateway
  maxconn 8000               # HAProxy wants ~2 fds per connection under the 20000 fd limit
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 120s
frontend bench
  bind 127.0.0.1:{port}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')
  http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
  http-request deny deny_status 401 unless {{ var(txn.iss) -m str {issuer} }}
  http-request deny deny_status 401 unless {{ var(txn.aud) -m str {AUDIENCE} }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{pubkey}") -m int 1 }}
  http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
  default_backend coordinator
backend coordinator
  http-reuse always
  server upstream 127.0.0.1:{upstream_port}
"""


def _config_keys() -> dict[str, set[str]]:
    """The keys this checkout's gateway config accepts, so the bench never writes one it would reject."""
    from proxy.settings import config as c

    sections = {"listen": c.ListenConfig, "upstream": c.UpstreamConfig, "auth": c.AuthConfig,
                "logging": c.LoggingConfig, "limits": c.LimitsConfig}
    if hasattr(c, "MetricsConfig"):
        sections["metrics"] = c.MetricsConfig
    keys = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()}
    keys[""] = {f.name for f in dataclasses.fields(c.GatewayConfig)}
    return keys


def metrics_key_exists() -> bool:
    return "enabled" in _config_keys().get("metrics", set())


def gateway_config(port: int, upstream: str, issuer: str | None, *, metrics: bool = False,
                   workers: int = 1, max_connections: int = 100, streams: int | None = None,
                   access_log: bool = False) -> dict[str, Any]:
    keys = _config_keys()
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port, "workers": workers},
        "upstream": {"url": upstream, "max_connections": max_connections},
        "auth": {"mode": "required", "issuers": [{
            "issuer": issuer, "audiences": [AUDIENCE], "jwks_uri": f"{issuer}/jwks", "algorithms": ["RS256"]}]}
        if issuer else {"mode": "disabled"},
        # Off unless asked: the headline gateway target asks for the production defaults (metrics and the
        # access log on, as operators run it), and so does the instruction count.
        "logging": {"level": "warning", "access_log": access_log},
        # Stopping between sections must not wait out a Kubernetes drain.
        "drain_delay_s": 0, "shutdown_grace_s": 1,
    }
    if streams is not None:
        # One token holds every stream: no per-principal cap and no share of the pool kept for other calls.
        cfg["upstream"]["stream_share"] = 1.0
        cfg["limits"] = {"max_streams_per_principal": streams}
    if "metrics" in keys:
        cfg["metrics"] = {"enabled": metrics, "host": "127.0.0.1", "port": free_port()}
    for section, values in cfg.items():
        if isinstance(values, dict) and section in keys:
            for key in [k for k in values if k not in keys[section]]:
                del values[key]
    return cfg


GATEWAY_SRC: Path | None = None   # --gateway-src: benchmark the `proxy` package found there instead


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment minus what the gateway or JARVIS would read as configuration."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ARP_", "JARVIS_")) and k not in ("LOG_LEVEL", "PYTHONPATH")}
    if GATEWAY_SRC is not None:
        # PYTHONPATH is searched before the editable install's finder, so `proxy` comes from there.
        env["PYTHONPATH"] = str(GATEWAY_SRC)
    env.update(extra or {})
    return env


# =========================================================================== targets


@dataclass
class Target:
    key: str
    label: str
    url: str                               # the POST /v1/runs URL
    pid: int | None = None                 # whose CPU time counts
    connections: int = 32
    duration: int = 5
    alone_on_core0: bool = True            # pinned to TARGET_CPU alone, so others' use of it is measurable
    checks_auth: bool = False              # must refuse bad tokens
    unavailable: str | None = None         # why it is n/a
    rounds: list[dict[str, Any]] = field(default_factory=list)
    preflight: str = ""

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.rounds if r.get("requests")]
        med = (lambda key: statistics.median([r[key] for r in ok if r.get(key) is not None])
               if any(r.get(key) is not None for r in ok) else None)
        requests = sum(r["requests"] for r in ok)
        failed = sum(r.get("non_2xx", 0) + r.get("socket_errors", 0) for r in ok)
        unavailable = self.unavailable
        if unavailable is None and not ok:
            unavailable = "no round completed: " + "; ".join(r.get("error", "") for r in self.rounds)[:200]
        elif unavailable is None and failed > requests / 100:
            # Fast errors (a 401 or 502) would look like great throughput: such a target is not measured.
            unavailable = f"{failed} of {requests} requests failed (non-2xx or socket errors)"
        return {"key": self.key, "label": self.label, "connections": self.connections,
                "duration_s": self.duration, "unavailable": unavailable, "preflight": self.preflight,
                "rps": med("rps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
                "cpu_us_per_req": med("cpu_us_per_req"), "non_2xx": sum(r.get("non_2xx", 0) for r in ok),
                "socket_errors": sum(r.get("socket_errors", 0) for r in ok), "rounds": self.rounds}


WRK_SCRIPT = """-- Generated by tests/bench/bench.py: an authenticated POST /v1/runs per request.
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"

-- One machine-readable line, so nothing depends on wrk's human output format.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.results: dict[str, Any] = {"sections": {}, "notes": []}
        self.targets: dict[str, Target] = {}
        self.ports = {name: free_port() for name in (
            "upstream", "nginx", "haproxy", "gw_auth", "gw_noauth", "gw_nometrics", "gw_runs", "gw_workers2",
            "gw_scale1", "gw_scale2",
            "jarvis", "token", "issuer", "stream", "gw_stream", "gw_startup")}
        self.issuer = f"http://127.0.0.1:{self.ports['issuer']}"
        self.token_file = workdir / "token.txt"
        self.token = ""

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.results["notes"].append(text)

    # ------------------------------------------------------------------ start-up of the fixture

    def start_fixture(self) -> None:
        """Issuer and static upstream, both on the load core."""
        p = self.procs.start("issuer", [sys.executable, str(BENCH_DIR / "servers.py"), "issuer",
                                        "--port", str(self.ports["issuer"]), "--out", str(self.workdir)],
                             LOAD_CPU, env=clean_env())
        wait_until("issuer", lambda: self.token_file.exists() and port_open(self.ports["issuer"]), 20,
                   p, self.procs, "issuer")
        self.token = self.token_file.read_text().strip()
        conf = self.workdir / "upstream.conf"
        conf.write_text(nginx_upstream_conf(self.workdir, self.ports["upstream"]))
        p = self.procs.start("upstream", ["nginx", "-c", str(conf), "-p", str(self.workdir),
                                          "-e", str(self.workdir / "upstream" / "error.log")], LOAD_CPU)
        wait_until("nginx upstream", lambda: port_open(self.ports["upstream"]), 10, p, self.procs, "upstream")
        self.upstream_pid = p.pid
        (self.workdir / "post.lua").write_text(WRK_SCRIPT % {"body": RUN_START_BODY, "token": self.token})

    def start_gateway(self, name: str, cfg: dict[str, Any], cpus: str) -> subprocess.Popen:
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML; no extra dependency
        return self.procs.start(name, [str(GATEWAY_BIN), "serve", "--config", str(path)], cpus, env=clean_env())

    def wait_gateway_ready(self, name: str, port: int, proc: subprocess.Popen, timeout: float = 20,
                           consecutive: int = 1) -> None:
        """/readyz 200 (JWKS loaded). With several workers, several fresh connections in a row must say so."""
        streak = [0]

        def ready() -> bool:
            ok = http_call("GET", f"http://127.0.0.1:{port}/readyz", timeout=1)[0] == 200
            streak[0] = streak[0] + 1 if ok else 0
            return streak[0] >= consecutive

        wait_until(f"{name} /readyz", ready, timeout, proc, self.procs, name)

    def add_target(self, key: str, label: str, port: int, start: Callable[[], int], **kw: Any) -> None:
        """`start` launches the target (pinned) and returns the pid whose CPU time counts."""
        target = Target(key, label, f"http://127.0.0.1:{port}/v1/runs", **kw)
        self.targets[key] = target
        try:
            target.pid = start()
            self.preflight(target)
        except (BenchError, OSError, http.client.HTTPException) as exc:
            target.unavailable = str(exc)
            print(f"  {label}: n/a: {exc}", flush=True)

    def start_targets(self) -> None:
        a, skip = self.args, set(self.args.skip)
        ports = self.ports
        d = a.duration
        upstream_url = f"http://127.0.0.1:{ports['upstream']}"

        self.add_target("direct", "nginx upstream, direct (the limit)", ports["upstream"],
                        lambda: self.upstream_pid, duration=d, alone_on_core0=False)

        def nginx() -> int:
            conf = self.workdir / "nginx-proxy.conf"
            conf.write_text(nginx_proxy_conf(self.workdir, ports["nginx"], ports["upstream"], ports["stream"]))
            p = self.procs.start("nginx-proxy", ["nginx", "-c", str(conf), "-p", str(self.workdir), "-e",
                                                 str(self.workdir / "nginx-proxy" / "error.log")], TARGET_CPU)
            wait_until("nginx proxy", lambda: port_open(ports["nginx"]), 10, p, self.procs, "nginx-proxy")
            return p.pid

        self.add_target("nginx", "nginx reverse proxy, no auth", ports["nginx"], nginx, duration=d)

        if "haproxy" not in skip:
            def haproxy() -> int:
                conf = self.workdir / "haproxy.cfg"
                conf.write_text(haproxy_conf(ports["haproxy"], ports["upstream"], self.issuer,
                                             self.workdir / "pubkey.pem"))
                check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True)
                if check.returncode != 0:
                    raise BenchError("haproxy rejected the jwt_verify config: "
                                     + " | ".join(check.stderr.strip().splitlines()[-3:]))
                p = self.procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)], TARGET_CPU)
                wait_until("haproxy", lambda: port_open(ports["haproxy"]), 10, p, self.procs, "haproxy")
                return p.pid

            self.add_target("haproxy", "HAProxy + RS256 jwt_verify", ports["haproxy"], haproxy, duration=d,
                            checks_auth=True)

        def gateway(key: str, issuer: str | None, cpus: str = TARGET_CPU, **kw: Any) -> Callable:
            def start() -> int:
                p = self.start_gateway(key, gateway_config(ports[key], upstream_url, issuer, **kw), cpus)
                self.wait_gateway_ready(key, ports[key], p, consecutive=4 if kw.get("workers", 1) > 1 else 1)
                return p.pid
            return start

        # The headline target runs as operators do, with the production defaults: metrics (on their own
        # listener) and the access log (to its log file here) on. nginx and HAProxy log nothing per request.
        self.add_target("gw_auth", "arp-gateway, auth required (RS256), metrics and access log on", ports["gw_auth"],
                        gateway("gw_auth", self.issuer, metrics=True, access_log=True), duration=d, checks_auth=True)
        self.add_target("gw_noauth", "arp-gateway, auth disabled", ports["gw_noauth"],
                        gateway("gw_noauth", None), duration=d)
        if "metrics" not in skip:
            if metrics_key_exists():
                self.add_target("gw_nometrics", "arp-gateway, auth required, metrics off (access log on)",
                                ports["gw_nometrics"], gateway("gw_nometrics", self.issuer, access_log=True),
                                duration=d, checks_auth=True)
            else:
                self.note("metrics on/off: this checkout's config has no metrics.enabled key: n/a")
        if "runs" not in skip:
            if "runs" in _config_keys()[""]:
                # Runs owned by their callers (issue 18): the caller bound into each start, owner
                # access, and an audit file when this checkout has one.
                def owned(**kw: Any) -> dict[str, Any]:
                    cfg = gateway_config(ports["gw_runs"], upstream_url, self.issuer, **kw)
                    cfg["runs"] = {"bind_identity": True, "access": "owner"}
                    if "audit" in _config_keys()[""]:
                        cfg["audit"] = {"sink": "file", "path": str(self.workdir / "audit.log")}
                    return cfg

                def runs_start() -> int:
                    p = self.start_gateway("gw_runs", owned(metrics=True, access_log=True), TARGET_CPU)
                    self.wait_gateway_ready("gw_runs", ports["gw_runs"], p)
                    return p.pid

                self.add_target("gw_runs", "arp-gateway, auth required, runs owned (binding, owner, audit file)",
                                ports["gw_runs"], runs_start, duration=d, checks_auth=True)
            else:
                self.note("runs owned: this checkout's config has no runs section: n/a")
        if "workers" not in skip:
            self.add_target("gw_workers2", "arp-gateway, auth required, 2 workers (cores 0+1)",
                            ports["gw_workers2"], gateway("gw_workers2", self.issuer, cpus=BOTH_CPUS, workers=2),
                            duration=d, checks_auth=True, alone_on_core0=False)
        if "jarvis" not in skip:
            self.add_target("jarvis", "JARVIS Run Gateway 0.3.8 (auth disabled)", ports["jarvis"],
                            self._start_jarvis, connections=a.jarvis_connections,
                            duration=min(d, a.jarvis_duration))

    def _start_jarvis(self) -> int:
        if not JARVIS_PY.exists():
            raise BenchError(f"{JARVIS_PY} missing: run tests/bench/run.sh to install arp-jarvis-rungateway")
        token = self.procs.start("token-endpoint", [sys.executable, str(BENCH_DIR / "servers.py"),
                                                    "token-endpoint", "--port", str(self.ports["token"])],
                                 LOAD_CPU, env=clean_env())
        wait_until("token endpoint", lambda: port_open(self.ports["token"]), 15, token, self.procs,
                   "token-endpoint")
        # JARVIS exchanges or requests an outbound token on every proxied call, even with
        # inbound auth disabled: the stand-in endpoint above answers those on the load core.
        env = clean_env({
            "JARVIS_RUN_COORDINATOR_URL": f"http://127.0.0.1:{self.ports['upstream']}",
            "ARP_AUTH_MODE": "disabled",
            "ARP_AUTH_CLIENT_ID": "bench",
            "ARP_AUTH_CLIENT_SECRET": "bench-secret",
            "ARP_AUTH_TOKEN_ENDPOINT": f"http://127.0.0.1:{self.ports['token']}/token",
            "LOG_LEVEL": "WARNING",  # it logs every run start at INFO; the others log nothing per request
        })
        p = self.procs.start("jarvis", [str(JARVIS_PY), "-m", "jarvis_run_gateway", "--host", "127.0.0.1",
                                        "--port", str(self.ports["jarvis"])], TARGET_CPU, env=env)
        wait_until("jarvis", lambda: http_call("GET", f"http://127.0.0.1:{self.ports['jarvis']}/v1/version",
                                          timeout=1)[0] == 200, 30, p, self.procs, "jarvis")
        return p.pid

    def preflight(self, t: Target) -> None:
        """One good request must start a run; on auth targets, bad tokens must be refused."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        status, body = http_call("POST", t.url, RUN_START_BODY, headers, timeout=10)
        if status not in (200, 201) or b"run_bench" not in body:
            raise BenchError(f"preflight POST /v1/runs answered {status}: {body[:200]!r}")
        if not t.checks_auth:
            t.preflight = "200 + Run"
            return
        bad = {"no token": None, "expired": (self.workdir / "expired.txt").read_text().strip(),
               "wrong aud": (self.workdir / "wrong-aud.txt").read_text().strip(),
               "bad signature": self.token[:-4] + ("AAAA" if not self.token.endswith("AAAA") else "BBBB")}
        for what, token in bad.items():
            h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
            status, _ = http_call("POST", t.url, RUN_START_BODY, h)
            if status != 401:
                raise BenchError(f"preflight: a request with {what} got {status}, not 401")
        t.preflight = "200 + Run; 401 for no token, expired, wrong aud, bad signature"

    # ------------------------------------------------------------------ throughput

    def wrk(self, t: Target, duration: int, name: str = "wrk") -> dict[str, Any]:
        out = self.procs.run(name, ["wrk", "-t1", f"-c{t.connections}", f"-d{duration}s", "--latency",
                                    "--timeout", "5s", "-s", str(self.workdir / "post.lua"), t.url],
                             LOAD_CPU, timeout=duration + 30)
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
        if line is None:
            raise BenchError(f"wrk printed no summary: {out[-300:]!r}")
        raw = json.loads(line.removeprefix("BENCHJSON "))
        return {"requests": raw["requests"], "rps": raw["requests"] / (raw["duration_us"] / 1e6),
                "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                "max_ms": raw["max_us"] / 1000, "non_2xx": raw["status"],
                "socket_errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]}

    def measure(self, t: Target, duration: int) -> dict[str, Any]:
        assert t.pid is not None
        before, core_before, wall = cpu_seconds(t.pid), core_ticks(int(TARGET_CPU)), time.monotonic()
        result = self.wrk(t, duration)
        used = cpu_seconds(t.pid) - before
        result["cpu_s"] = round(used, 3)
        result["cpu_us_per_req"] = used * 1e6 / result["requests"] if result["requests"] else None
        if t.alone_on_core0:
            # The machine is shared and other people's processes are not pinned: what core 0 did
            # besides the target, and what the hypervisor stole from it, says how clean a round was.
            busy, steal = (a - b for a, b in zip(core_ticks(int(TARGET_CPU)), core_before))
            wall = time.monotonic() - wall
            result["others_on_core_pct"] = round(max(0.0, busy / CLK_TCK - used) / wall * 100, 1)
            result["steal_pct"] = round(steal / CLK_TCK / wall * 100, 1)
        return result

    def throughput(self) -> None:
        live = [t for t in self.targets.values() if t.unavailable is None]
        if self.args.warmup:
            print("warm-up: 1 s per target", flush=True)
            for t in live:
                try:
                    self.wrk(t, 1)
                except BenchError as exc:
                    self.note(f"warm-up of {t.key} failed: {exc}")
        for r in range(self.args.rounds):
            # Round-robin with a rotating start, so drift on a shared machine hits every target alike.
            order = live[r % len(live):] + live[:r % len(live)]
            for t in order:
                try:
                    res = self.measure(t, t.duration)
                except BenchError as exc:
                    res = {"error": str(exc)}
                t.rounds.append(res)
                print(f"round {r + 1}/{self.args.rounds} {t.key:12s} " + (
                    f"{res['rps']:9.0f} req/s  p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms  "
                    f"cpu {res['cpu_us_per_req'] or 0:7.0f} µs/req  non-2xx {res['non_2xx']}"
                    + (f"  core 0: others {res['others_on_core_pct']}% steal {res['steal_pct']}%"
                       if "steal_pct" in res else "")
                    if "rps" in res else f"error: {res['error']}"), flush=True)
        self.results["sections"]["throughput"] = {t.key: t.summary() for t in self.targets.values()}
        if "gw_nometrics" in self.targets and not self.targets["gw_nometrics"].unavailable:
            port = json.loads((self.workdir / "gw_auth.yaml").read_text())["metrics"]["port"]
            try:
                status, body = http_call("GET", f"http://127.0.0.1:{port}/metrics", timeout=2)
                answered = status == 200
            except (OSError, http.client.HTTPException):
                answered = False
            self.results["sections"]["metrics_listener_answered"] = answered
            if not answered:
                self.note("metrics.enabled: true was set, but nothing answered GET /metrics on metrics.port: the "
                          "gateway under test does not implement metrics yet, so on/off compared two identical "
                          "gateways (their difference is this machine's noise)")

    def pairs(self) -> None:
        """The two close comparisons again, in back-to-back pairs of short rounds, alternating which
        goes first: gateway-auth against HAProxy, and metrics on against off.

        Rounds of one target in the main table are many seconds apart, and this shared machine
        drifts over that time by more than the margins being judged; the two rounds of a pair share
        the machine's state, so the median of the pair ratios is the steadier estimate."""
        section: dict[str, Any] = {}
        for name, a_key, b_key in (("gw_auth_vs_haproxy", "gw_auth", "haproxy"),
                                   ("metrics_on_vs_off", "gw_auth", "gw_nometrics"),
                                   ("runs_owned_vs_off", "gw_runs", "gw_auth")):
            a, b = self.targets.get(a_key), self.targets.get(b_key)
            if a is None or b is None or a.unavailable or b.unavailable:
                continue
            pairs = []
            for i in range(self.args.pairs):
                first, second = (a, b) if i % 2 == 0 else (b, a)
                try:
                    got = {t.key: self.measure(t, PAIR_S) for t in (first, second)}
                except BenchError as exc:
                    self.note(f"{name} pair {i + 1} failed: {exc}")
                    continue
                pairs.append({"a_rps": got[a.key]["rps"], "b_rps": got[b.key]["rps"],
                              "a_cpu_us": got[a.key]["cpu_us_per_req"], "b_cpu_us": got[b.key]["cpu_us_per_req"]})
            if pairs:
                section[name] = {"a": a.label, "b": b.label, "pairs": pairs,
                                 "rps_ratio": statistics.median(p["a_rps"] / p["b_rps"] for p in pairs),
                                 "cpu_ratio": statistics.median(p["a_cpu_us"] / p["b_cpu_us"] for p in pairs)}
                print(f"{name}, {len(pairs)} pairs: req/s x{section[name]['rps_ratio']:.3f}", flush=True)
        self.results["sections"]["pairs"] = {"seconds": PAIR_S, **section}

    def scaling(self) -> None:
        """`listen.workers` 1 against 2 with the same CPU budget per worker.

        The 2-worker target above runs on both cores of this machine, so its second worker shares
        core 1 with wrk and the upstream: its ratio says how much CPU the load generator leaves, not
        how the gateway scales. Here every worker gets a quota of SCALING_SHARE of a core (a cgroup
        each) and worker i is pinned to core i, which leaves the load its own CPU: 2 workers / 1 is
        then the gateway's own scaling (SO_REUSEPORT spread, no shared state), as on 2 free cores."""
        section: dict[str, Any] = {"share": SCALING_SHARE}
        self.results["sections"]["scaling"] = section
        upstream_url = f"http://127.0.0.1:{self.ports['upstream']}"
        budgets: list[CpuBudget] = []
        targets: dict[int, tuple[Target, list[int]]] = {}
        try:
            for n in (1, 2):
                key = f"gw_scale{n}"
                proc = self.start_gateway(key, gateway_config(self.ports[key], upstream_url, self.issuer, workers=n),
                                          BOTH_CPUS)
                self.wait_gateway_ready(key, self.ports[key], proc, consecutive=4 if n > 1 else 1)
                workers = [proc.pid] if n == 1 else [p for p in process_tree(proc.pid) if p != proc.pid]
                if len(workers) != n:
                    raise BenchError(f"{key}: expected {n} worker processes, found {len(workers)}")
                for i, pid in enumerate(sorted(workers)):
                    os.sched_setaffinity(pid, {i})
                    budgets.append(CpuBudget(f"arp-bench-{os.getpid()}-w{n}-{i}", SCALING_SHARE))
                    budgets[-1].add(pid)
                target = Target(key, f"{n} worker(s)", f"http://127.0.0.1:{self.ports[key]}/v1/runs",
                                pid=proc.pid, duration=self.args.duration)
                self.preflight(target)
                targets[n] = (target, workers)
        except (OSError, BenchError, http.client.HTTPException) as exc:
            section["unavailable"] = f"{type(exc).__name__}: {exc}"
            self.note(f"worker scaling with a CPU budget per worker: n/a: {exc}")
            self.procs.stop_named({"gw_scale1", "gw_scale2"})
            for b in budgets:
                b.remove()
            return
        if self.args.warmup:
            for target, _ in targets.values():
                self.wrk(target, 1)
        rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        # Back-to-back pairs, alternating which goes first: the machine's speed drifts between
        # rounds by more than the few tens of percent being judged.
        for r in range(self.args.scaling_pairs):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                target, workers = targets[n]
                if n == 1:
                    # The 2-worker gateway has a worker on each core, and core 1 also carries the load:
                    # the single worker alternates between the cores so that it meets the same.
                    os.sched_setaffinity(workers[0], {r % 2})
                before = {pid: cpu_seconds(pid) for pid in workers}
                wall = time.monotonic()
                try:
                    res = self.wrk(target, SCALING_ROUND_S)
                except BenchError as exc:
                    res = {"error": str(exc)}
                wall = time.monotonic() - wall
                res["worker_cpu_pct"] = [round((cpu_seconds(pid) - before[pid]) / wall * 100) for pid in workers]
                rounds[n].append(res)
                res["cores"] = sorted(os.sched_getaffinity(workers[0])) if n == 1 else [0, 1]
                print(f"scaling pair {r + 1}/{self.args.scaling_pairs} {n} worker(s) on cores {res['cores']} "
                      + (f"{res['rps']:9.0f} req/s  worker CPU % {res['worker_cpu_pct']}" if "rps" in res
                         else f"error: {res['error']}"), flush=True)
        self.procs.stop_named({"gw_scale1", "gw_scale2"})
        for b in budgets:
            b.remove()
        pairs = [b["rps"] / a["rps"] for a, b in zip(rounds[1], rounds[2]) if a.get("rps") and b.get("rps")]
        section.update({
            "rounds": {str(n): v for n, v in rounds.items()},
            "rps": {str(n): statistics.median([x["rps"] for x in v if "rps" in x]) if any("rps" in x for x in v)
                    else None for n, v in rounds.items()},
            "ratio": statistics.median(pairs) if pairs else None,
        })

    def profile(self) -> None:
        t = self.targets.get("gw_auth")
        if t is None or t.unavailable or not PYSPY_BIN.exists():
            self.results["sections"]["profile"] = {"unavailable": "py-spy or the gateway is missing"}
            return
        secs = self.args.duration
        raw = self.workdir / "profile.txt"
        # Sampled from the load core without pausing the gateway (--nonblocking), during an
        # extra round that is not counted above: the sampler costs the target some speed.
        spy = self.procs.start("py-spy", [str(PYSPY_BIN), "record", "--pid", str(t.pid), "--duration",
                                          str(secs), "--rate", "250", "--format", "raw", "--nolineno",
                                          "--nonblocking", "--output", str(raw)], LOAD_CPU)
        time.sleep(0.5)
        try:
            load = self.wrk(t, secs, name="wrk-profile")
            spy.wait(secs + 30)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            self.results["sections"]["profile"] = {"unavailable": f"profile round failed: {exc}"}
            return
        finally:
            self.procs.stop(spy)
        if not raw.exists():
            self.results["sections"]["profile"] = {"unavailable": f"py-spy wrote nothing: {self.procs.tail('py-spy')}"}
            return
        self_time: dict[str, int] = {}
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = stack.split(";")[-1]
            self_time[leaf] = self_time.get(leaf, 0) + int(count)
            total += int(count)
        top = sorted(self_time.items(), key=lambda kv: -kv[1])[:15]
        # The same self time by top-level package (`func (aiohttp/client.py)` -> aiohttp): where a fix would go.
        packages: dict[str, int] = {}
        for frame, n in self_time.items():
            where = frame.rpartition(" (")[2].rstrip(")")
            package = where.split("/")[0].removesuffix(".py") if "/" in where else where.removesuffix(".py")
            packages[package or "?"] = packages.get(package or "?", 0) + n
        self.results["sections"]["profile"] = {
            "samples": total, "rps_while_sampled": round(load["rps"]),
            "top_self": [{"frame": frame, "samples": n, "pct": round(100 * n / total, 1)} for frame, n in top],
            "by_package": {k: round(100 * v / total, 1) for k, v in
                           sorted(packages.items(), key=lambda kv: -kv[1])[:10]}}
        shutil.copy(raw, RESULTS_DIR / "profile-gw_auth.txt")

    # ------------------------------------------------------------------ fixed-rate latency

    def fixed_rate(self) -> None:
        keys = [k for k in ("direct", "gw_auth", "haproxy", "nginx")
                if k in self.targets and not self.targets[k].unavailable]
        out: dict[str, Any] = {}
        for key in keys:
            t = self.targets[key]
            try:
                text = self.procs.run(f"openloop-{key}", [
                    sys.executable, str(BENCH_DIR / "clients.py"), "openloop", "--url", t.url,
                    "--token-file", str(self.token_file), "--rate", str(self.args.rate),
                    "--count", str(self.args.openloop_count), "--warmup", str(self.args.openloop_count // 10)],
                    LOAD_CPU, timeout=self.args.openloop_count / self.args.rate * 1.1 + 60)
                out[key] = json.loads(text.strip().splitlines()[-1])
            except (BenchError, ValueError, IndexError) as exc:
                out[key] = {"error": str(exc)}
            r = out[key]
            print(f"fixed {self.args.rate:.0f}/s {key:10s} " + (
                f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  statuses {r['statuses']}  "
                f"conns {r['connections']}  queued {r['queued']}  max send lag {r['max_send_lag_ms']} ms"
                if "p50_ms" in r else f"error: {r['error']}"), flush=True)
        self.results["sections"]["fixed_rate"] = out

    # ------------------------------------------------------------------ start-up

    def startup(self) -> None:
        port = self.ports["gw_startup"]
        cfg = gateway_config(port, f"http://127.0.0.1:{self.ports['upstream']}", self.issuer)
        times = []
        for i in range(self.args.startup_samples):
            t0 = time.perf_counter()
            p = self.start_gateway(f"gw_startup_{i}", cfg, TARGET_CPU)
            try:
                self.wait_gateway_ready("gw_startup", port, p, timeout=20)
                times.append(time.perf_counter() - t0)
            except BenchError as exc:
                self.note(f"start-up sample {i} failed: {exc}")
            finally:
                self.procs.stop(p)
            time.sleep(0.3)
        self.results["sections"]["startup"] = {"samples_s": [round(x, 3) for x in times],
                                               "median_s": statistics.median(times) if times else None}
        print(f"start-up to ready: {', '.join(f'{x:.3f}' for x in times)} s", flush=True)

    # ------------------------------------------------------------------ streaming

    def streaming(self) -> None:
        a, ports = self.args, self.ports
        res: dict[str, Any] = {}
        self.results["sections"]["streaming"] = res
        up = self.procs.start("stream-upstream", [sys.executable, str(BENCH_DIR / "servers.py"),
                                                  "stream-upstream", "--port", str(ports["stream"])], LOAD_CPU,
                              env=clean_env())
        wait_until("stream upstream", lambda: port_open(ports["stream"]), 15, up, self.procs, "stream-upstream")
        # Room for the 1,000 held streams: the default pool (100) would queue 900 of them.
        gw = self.start_gateway("gw_stream", gateway_config(ports["gw_stream"], f"http://127.0.0.1:{ports['stream']}",
                                                            self.issuer, max_connections=1100, streams=1100),
                              TARGET_CPU)
        self.wait_gateway_ready("gw_stream", ports["gw_stream"], gw)
        bases = {"direct": f"http://127.0.0.1:{ports['stream']}",
                 "nginx": f"http://127.0.0.1:{ports['nginx']}",
                 "gateway": f"http://127.0.0.1:{ports['gw_stream']}"}
        if self.targets.get("nginx") is None or self.targets["nginx"].unavailable:
            del bases["nginx"]

        # --- byte rate, with the gateway's RSS sampled throughout
        mib = a.stream_mib
        rates: dict[str, list[float]] = {k: [] for k in bases}
        rss: list[dict[str, float]] = []
        for r in range(a.rounds):
            for key, base in bases.items():
                sampler = RssSampler(gw.pid) if key == "gateway" else None
                try:
                    if sampler:
                        with sampler:
                            rate = self.curl_rate(f"{key}-{r}", f"{base}/v1/runs/bulk-{mib}/events", mib)
                        rss.append({"before": sampler.before, "peak": sampler.peak, "after": sampler.after()})
                    else:
                        rate = self.curl_rate(f"{key}-{r}", f"{base}/v1/runs/bulk-{mib}/events", mib)
                    rates[key].append(rate)
                    print(f"stream {mib} MiB round {r + 1} {key:8s} {rate:8.1f} MiB/s"
                          + (f"  gateway RSS {rss[-1]['before']:.1f} -> peak {rss[-1]['peak']:.1f} -> "
                             f"{rss[-1]['after']:.1f} MiB" if sampler else ""), flush=True)
                except BenchError as exc:
                    self.note(f"stream {key}: {exc}")
        res["bulk"] = {"mib": mib, "mib_per_s": {k: v for k, v in rates.items()},
                       "median_mib_per_s": {k: statistics.median(v) if v else None for k, v in rates.items()},
                       "gateway_rss_mib": rss,
                       "gateway_rss_growth_mib": max((x["peak"] - x["before"] for x in rss), default=None)}

        # --- per-line latency: a line every 10 ms, each stamped with its write time
        lines = {}
        for key, base in bases.items():
            url = f"{base}/v1/runs/tick-{a.lines}-10/events"
            try:
                lines[key] = json.loads(self.procs.run(
                    f"lines-{key}", [sys.executable, str(BENCH_DIR / "clients.py"), "lines", "--url", url,
                                     "--token-file", str(self.token_file)], LOAD_CPU,
                    timeout=a.lines * 0.01 + 30).strip().splitlines()[-1])
            except (BenchError, ValueError, IndexError) as exc:
                lines[key] = {"error": str(exc)}
            print(f"line latency {key:8s} {lines[key]}", flush=True)
        res["lines"] = lines

        # --- many open streams: the gateway's memory per idle-ish stream
        before = rss_mib(gw.pid)
        with RssSampler(gw.pid, interval=0.05) as sampler:
            try:
                held = json.loads(self.procs.run(
                    "streams", [sys.executable, str(BENCH_DIR / "clients.py"), "streams", "--base",
                                bases["gateway"], "--token-file", str(self.token_file), "--count",
                                str(a.streams), "--hold", str(a.hold)], LOAD_CPU,
                    timeout=a.hold + 90).strip().splitlines()[-1])
            except (BenchError, ValueError, IndexError) as exc:
                held = {"error": str(exc)}
        after = sampler.after()
        held.update({"rss_before_mib": before, "rss_peak_mib": sampler.peak, "rss_after_mib": after,
                     "rss_delta_mib": sampler.peak - before})
        res["many_streams"] = held
        print(f"{a.streams} open streams: {held}", flush=True)
        self.procs.stop(gw)
        self.procs.stop(up)

    def curl_rate(self, name: str, url: str, mib: int) -> float:
        out = self.procs.run(f"curl-{name}", [
            "curl", "-sS", "--max-time", str(self.args.stream_timeout), "-o", "/dev/null",
            "-H", f"Authorization: Bearer {self.token}", "-w", "%{http_code} %{size_download} %{time_total}",
            url], LOAD_CPU, timeout=self.args.stream_timeout + 10)
        code, size, secs = out.split()
        if code != "200" or int(size) != mib * 1024 * 1024:
            raise BenchError(f"{url}: HTTP {code}, {size} bytes of {mib * 1024 * 1024}")
        return int(size) / 1024 / 1024 / float(secs)


# =========================================================================== verdicts and report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratio(tp: dict[str, Any], a: str, b: str) -> float | None:
    """Median over rounds of a's req/s / b's req/s in the same round.

    Targets of one round run within seconds of each other, so pairing them
    cancels the slow drift of a shared machine better than a ratio of medians.
    """
    ta, tb = tp.get(a), tp.get(b)
    if not ta or not tb or ta["unavailable"] or tb["unavailable"]:
        return None
    pairs = [x["rps"] / y["rps"] for x, y in zip(ta["rounds"], tb["rounds"]) if x.get("rps") and y.get("rps")]
    return statistics.median(pairs) if pairs else ratio(ta["rps"], tb["rps"])


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["sections"]
    tp = s.get("throughput", {})

    def rps(key: str) -> float | None:
        t = tp.get(key)
        return t["rps"] if t and not t["unavailable"] else None

    fixed = s.get("fixed_rate", {})
    direct, gw, hap = fixed.get("direct", {}), fixed.get("gw_auth", {}), fixed.get("haproxy", {})
    added = (lambda r, pct: r[pct] - direct[pct] if pct in r and pct in direct else None)
    stream = s.get("streaming", {})
    bulk = stream.get("bulk", {}).get("median_mib_per_s", {})
    line = stream.get("lines", {}).get("gateway", {})
    many = stream.get("many_streams", {})
    pairs = s.get("pairs", {})
    metrics_ratio = pairs.get("metrics_on_vs_off", {}).get("rps_ratio") or paired_ratio(tp, "gw_auth", "gw_nometrics")
    haproxy_ratio = pairs.get("gw_auth_vs_haproxy", {}).get("rps_ratio") or paired_ratio(tp, "gw_auth", "haproxy")
    metrics_note = None
    if "gw_nometrics" not in tp:
        metrics_note = "n/a: not measured (skipped, or no metrics.enabled key)"
    elif s.get("metrics_listener_answered") is False:
        metrics_note = "n/a: metrics not implemented (no /metrics listener)"

    rows = [
        ("gateway-auth / HAProxy-jwt req/s (back-to-back pairs)", haproxy_ratio, ">= 1.0", lambda v: v >= 1.0, "x"),
        ("(gateway-auth / HAProxy-jwt, main-table rounds)", None if paired_ratio(tp, "gw_auth", "haproxy") is None
         else f"{paired_ratio(tp, 'gw_auth', 'haproxy'):.2f}", "reference", None, "x"),
        ("gateway-auth / JARVIS req/s", paired_ratio(tp, "gw_auth", "jarvis"), ">= 200", lambda v: v >= 200, "x"),
        ("gateway-auth CPU per request", tp["gw_auth"]["cpu_us_per_req"] if rps("gw_auth") else None, "<= 50 µs",
         lambda v: v <= 50, "µs"),
        ("added p50 vs direct @1k req/s", added(gw, "p50_ms"), "<= +0.4 ms", lambda v: v <= 0.4, "ms"),
        ("added p99 vs direct @1k req/s", added(gw, "p99_ms"), "<= +1 ms", lambda v: v <= 1.0, "ms"),
        ("(HAProxy added p50 / p99 @1k req/s)", None if added(hap, "p50_ms") is None else
         f"{added(hap, 'p50_ms'):+.3f} / {added(hap, 'p99_ms'):+.3f}", "reference", None, "ms"),
        ("stream byte rate gateway / nginx", ratio(bulk.get("gateway"), bulk.get("nginx")), ">= 1.0",
         lambda v: v >= 1.0, "x"),
        ("gateway RSS growth on the big stream", stream.get("bulk", {}).get("gateway_rss_growth_mib"),
         "<= 16 MiB", lambda v: v <= 16, "MiB"),
        ("gateway RSS for 1,000 open streams", many.get("rss_delta_mib") if many.get("opened") else None,
         "<= 64 MiB", lambda v: v <= 64, "MiB"),
        ("line latency p50 through the gateway", line.get("p50_ms"), "<= 1 ms", lambda v: v <= 1.0, "ms"),
        ("start-up to ready (median)", s.get("startup", {}).get("median_s"), "<= 1 s", lambda v: v <= 1.0, "s"),
        ("metrics on / off req/s (back-to-back pairs)", metrics_ratio, "within 5%", lambda v: abs(v - 1) <= 0.05, "x"),
        ("workers 2 / 1 req/s, same CPU budget per worker", s.get("scaling", {}).get("ratio"), ">= 1.8",
         lambda v: v >= 1.8, "x"),
        ("(workers 2 / 1, 2nd worker sharing core 1 with wrk)", None if paired_ratio(tp, "gw_workers2", "gw_auth")
         is None else f"{paired_ratio(tp, 'gw_workers2', 'gw_auth'):.2f}", "reference", None, "x"),
    ]
    out = []
    for name, value, target, check, unit in rows:
        if check is None:
            verdict = "info"
        elif value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if check(value) else "FAIL"
        if name.startswith("metrics") and metrics_note:
            verdict = metrics_note
        out.append({"check": name, "value": value, "unit": unit, "target": target, "verdict": verdict})
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# ARP Run Gateway: side-by-side benchmark", "",
        f"- date: {results['date']}",
        f"- mode: {results['mode']} ({results['config']['rounds']} round(s) x {results['config']['duration']} s, "
        f"stream {results['config']['stream_mib']} MiB), wall time {results['wall_s']:.0f} s",
        f"- machine: nproc {env['nproc']}, {env['cpu_model']}, {env['kernel']}; load average at start "
        f"{env['loadavg_at_start']} (a shared machine: other work there is noise in every number)",
        f"- gateway under test: {env['gateway']}",
        f"- python {env['python']}, aiohttp {env['aiohttp']}; {env['tools']}",
        "- layout: target pinned to core 0; wrk/clients, upstreams, issuer on core 1 "
        "(the 2-worker gateway of the throughput table uses both cores and so shares core 1 with wrk; "
        "the scaling section gives each worker its own CPU budget instead)",
        "- load: `wrk -t1 -c32` (JARVIS: lower -c, shorter) authenticated `POST /v1/runs`, "
        "medians over interleaved rounds; CPU = target process time / requests", "",
    ]
    if results["mode"] == "quick":
        lines += ["> Quick mode is a smoke test: no warm-up and one short round per target, so the "
                  "numbers and verdicts below are indicative only. Run without `--quick` to measure.", ""]
    lines += [
        "## Throughput", "",
        "| target | conns | req/s | p50 ms | p99 ms | CPU µs/req | non-2xx | per-round req/s | "
        "others / steal on core 0, % per round |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for t in results["sections"].get("throughput", {}).values():
        if t["unavailable"]:
            lines.append(f"| {t['label']} | {t['connections']} | n/a | | | | | {t['unavailable'][:120]} | |")
            continue
        per = ", ".join((f"{r['rps']:.0f}" + ("*" if r.get("others_on_core_pct", 0) >= NOISY_PCT else ""))
                        if "rps" in r else "err" for r in t["rounds"])
        noise = ", ".join(f"{r['others_on_core_pct']:.0f}/{r['steal_pct']:.0f}" for r in t["rounds"]
                          if "steal_pct" in r) or "n/a: not alone on core 0"
        lines.append(f"| {t['label']} | {t['connections']} | {fmt(t['rps'], 0)} | {fmt(t['p50_ms'])} | "
                     f"{fmt(t['p99_ms'])} | {fmt(t['cpu_us_per_req'], 0)} | {t['non_2xx']} | {per} | {noise} |")
    lines += ["", "`others` is core 0 time used by processes other than the target during the round (this "
                  "machine is shared), `steal` the time the hypervisor took; both as % of the round. A round "
                  f"marked * had others >= {NOISY_PCT}%: it is kept (no cherry-picking), but read it as noise. "
                  "Ratios between targets below are medians of same-round ratios."]
    fixed = results["sections"].get("fixed_rate")
    if fixed:
        lines += ["", f"## Fixed rate ({results['config']['rate']:.0f} req/s open loop, "
                      f"{results['config']['openloop_count']} requests)", "",
                  "Latency from the moment each request was sent, or was due if it had to queue for a "
                  "connection (`queued`: the target fell behind the rate). `send lag` is how late the client "
                  "itself sent its worst request (its own scheduling on the shared core), for judging the tail.", "",
                  "| target | p50 ms | p90 ms | p99 ms | max ms | statuses | connections | queued | max send lag ms |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for k, r in fixed.items():
            lines.append(f"| {k} | {fmt(r.get('p50_ms'), 3)} | {fmt(r.get('p90_ms'), 3)} | {fmt(r.get('p99_ms'), 3)} | "
                         f"{fmt(r.get('max_ms'), 3)} | {r.get('statuses', r.get('error'))} | "
                         f"{r.get('connections', '')} | "
                         f"{r.get('queued', '')} | {r.get('max_send_lag_ms', '')} |")
    st = results["sections"].get("streaming")
    if st:
        bulk = st.get("bulk", {})
        lines += ["", "## Streaming", "",
                  f"NDJSON, {bulk.get('mib')} MiB per stream (MiB/s, median; per round in brackets):", ""]
        for k, v in bulk.get("median_mib_per_s", {}).items():
            lines.append(f"- {k}: {fmt(v, 1)} {[round(x) for x in bulk['mib_per_s'][k]]}")
        for x in bulk.get("gateway_rss_mib", []):
            lines.append(f"- gateway RSS: before {x['before']:.1f}, peak {x['peak']:.1f}, after {x['after']:.1f} MiB")
        lines += ["", "Line latency (a line every 10 ms; receive - write, CLOCK_MONOTONIC):", ""]
        for k, v in st.get("lines", {}).items():
            lines.append(f"- {k}: p50 {fmt(v.get('p50_ms'), 3)} ms, p99 {fmt(v.get('p99_ms'), 3)} ms "
                         f"({v.get('lines', 0)} lines)" if "p50_ms" in v else f"- {k}: {v.get('error')}")
        m = st.get("many_streams", {})
        lines += ["", f"Open streams through the gateway: {m.get('opened')} of {m.get('requested')} opened in "
                      f"{m.get('open_seconds')} s, held {m.get('held_seconds')} s; "
                      f"RSS {fmt(m.get('rss_before_mib'), 1)}"
                      f" -> peak {fmt(m.get('rss_peak_mib'), 1)} -> {fmt(m.get('rss_after_mib'), 1)} MiB"
                      + (f"; failures {m['failures']}" if m.get("failures") else "")]
    su = results["sections"].get("startup")
    if su:
        lines += ["", f"Start-up to /readyz 200 (JWKS fetched): {su['samples_s']} s"]
    pr = results["sections"].get("pairs", {})
    for name, title in (("gw_auth_vs_haproxy", "gateway-auth / HAProxy-jwt"), ("metrics_on_vs_off", "metrics on / off"),
                        ("runs_owned_vs_off", "runs owned / off")):
        if name in pr:
            x = pr[name]
            lines += ["", f"## {title}: {len(x['pairs'])} back-to-back pairs of {pr['seconds']} s rounds", "",
                      f"{x['a']} against {x['b']}, alternating which goes first; median of the pair ratios: req/s "
                      f"x{x['rps_ratio']:.3f}, CPU per request x{x['cpu_ratio']:.3f}. Per pair (req/s): "
                      + ", ".join(f"{p['a_rps']:.0f}/{p['b_rps']:.0f}" for p in x["pairs"])]
    sc = results["sections"].get("scaling")
    if sc:
        lines += ["", f"## Worker scaling: the same CPU budget per worker ({sc['share']} of a core each)", "",
                  "Each worker of `listen.workers: 1` and `listen.workers: 2` runs in a cgroup of its own with a "
                  "CFS quota of that share, worker i pinned to core i, so wrk and the upstream keep CPU of their "
                  "own; the 2-worker target in the throughput table instead shares core 1 with them.", ""]
        if sc.get("unavailable"):
            lines.append(f"n/a: {sc['unavailable']}")
        else:
            for n, rounds in sc["rounds"].items():
                per = ", ".join(f"{x['rps']:.0f} (CPU % {x['worker_cpu_pct']})" if "rps" in x else "err"
                                for x in rounds)
                lines.append(f"- {n} worker(s): median {fmt(sc['rps'][n], 0)} req/s; per {SCALING_ROUND_S} s round: {per}")
            lines.append(f"- 2 / 1, median of the back-to-back pair ratios: {fmt(sc['ratio'])}x")
    lines += ["", "## Verdicts", "", "| check | measured | target | verdict |", "|---|---:|---|---|"]
    for v in results["verdicts"]:
        value = v["value"] if isinstance(v["value"], str) else fmt(v["value"], 3 if v["unit"] in ("ms", "s") else 2)
        lines.append(f"| {v['check']} | {value} {v['unit'] if v['value'] is not None else ''} | {v['target']} | "
                     f"{v['verdict']} |")
    prof = results["sections"].get("profile")
    if prof:
        lines += ["", "## Profile: authenticated gateway under wrk load (py-spy, self time)", ""]
        if prof.get("unavailable"):
            lines.append(f"n/a: {prof['unavailable']}")
        else:
            lines += [f"{prof['samples']} samples at 250 Hz (idle excluded); {prof['rps_while_sampled']} req/s "
                      "while sampled (not counted above). Raw stacks: results/profile-gw_auth.txt", "",
                      "| % | samples | frame |", "|---:|---:|---|"]
            lines += [f"| {x['pct']} | {x['samples']} | `{x['frame']}` |" for x in prof["top_self"]]
            lines += ["", "Self time by package: " + ", ".join(f"{k} {v}%" for k, v in prof["by_package"].items())]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any]) -> None:
    print("\n%-52s %10s %9s %9s %11s %8s" % ("target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "non-2xx"))
    for t in results["sections"].get("throughput", {}).values():
        if t["unavailable"]:
            print("%-52s %10s   %s" % (t["label"], "n/a", t["unavailable"][:80]))
        else:
            print("%-52s %10s %9s %9s %11s %8d" % (t["label"], fmt(t["rps"], 0), fmt(t["p50_ms"]), fmt(t["p99_ms"]),
                                                  fmt(t["cpu_us_per_req"], 0), t["non_2xx"]))
    print("\n%-42s %16s %12s  %s" % ("check", "measured", "target", "verdict"))
    for v in results["verdicts"]:
        value = v["value"] if isinstance(v["value"], str) else fmt(v["value"], 3)
        print("%-42s %12s %-3s %12s  %s" % (v["check"], value, v["unit"] if v["value"] is not None else "",
                                            v["target"], v["verdict"]))


def environment() -> dict[str, str]:
    import aiohttp

    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "missing"

    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    jarvis = version([str(JARVIS_PY), "-c", "import importlib.metadata as m; "
                      "print('arp-jarvis-rungateway', m.version('arp-jarvis-rungateway'))"])
    tools = "; ".join([version(["nginx", "-v"]), version(["haproxy", "-v"]), version(["wrk", "-v"]).split(" [")[0],
                       version([str(PYSPY_BIN), "--version"]), jarvis])
    rev = version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    gateway = f"--gateway-src {GATEWAY_SRC}" if GATEWAY_SRC else f"this checkout ({rev})"
    return {"nproc": str(os.cpu_count()), "cpu_model": model, "kernel": platform.release(), "gateway": gateway,
            "loadavg_at_start": loadavg,
            "python": platform.python_version(), "aiohttp": aiohttp.__version__, "tools": tools}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 round x 2 s, 32 MiB stream, fewer samples")
    p.add_argument("--rounds", type=int, help="interleaved load rounds per target (default 3, quick 1)")
    p.add_argument("--duration", type=int, help="seconds per wrk round (default 5, quick 2)")
    p.add_argument("--stream-mib", type=int, help="MiB per bulk stream (default 1024, quick 32)")
    p.add_argument("--jarvis-connections", type=int, default=4, help="wrk -c for JARVIS (~45 ms per call)")
    p.add_argument("--jarvis-duration", type=int, help="seconds per JARVIS round (default 3, quick 1)")
    p.add_argument("--pairs", type=int, help="back-to-back pairs per close comparison (default 10, quick 1)")
    p.add_argument("--scaling-pairs", type=int, help="back-to-back 1/2-worker pairs (default 8, quick 1)")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop requests per second")
    p.add_argument("--openloop-count", type=int, help="open-loop requests per target (default 5000, quick 1000)")
    p.add_argument("--lines", type=int, help="lines for the line-latency test (default 200, quick 50)")
    p.add_argument("--streams", type=int, default=1000, help="concurrent open streams through the gateway")
    p.add_argument("--hold", type=float, help="seconds to hold the open streams (default 3, quick 1)")
    p.add_argument("--startup-samples", type=int, help="gateway start-ups to time (default 3, quick 1)")
    p.add_argument("--stream-timeout", type=int, default=300, help="bound on one bulk stream, seconds")
    p.add_argument("--skip", nargs="*", default=[], choices=["haproxy", "jarvis", "metrics", "workers", "profile",
                                                             "fixed-rate", "startup", "streaming", "runs"])
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the 1 s warm-up per target")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (printed path)")
    p.add_argument("--gateway-src", type=Path, help="directory holding another `proxy` package to benchmark, "
                   "e.g. `git archive HEAD proxy | tar -x -C DIR` of another revision (default: this checkout)")
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"rounds": 1 if q else 3, "duration": 2 if q else 5, "stream_mib": 32 if q else 1024,
                "jarvis_duration": 1 if q else 3, "openloop_count": 1000 if q else 5000, "lines": 50 if q else 200,
                "hold": 1.0 if q else 3.0, "startup_samples": 1 if q else 3,
                "pairs": 1 if q else 10, "scaling_pairs": 1 if q else 8}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if q:
        a.warmup = False
    return a


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `finally`, like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    global GATEWAY_SRC
    args = parse_args(argv)
    if args.gateway_src is not None:
        GATEWAY_SRC = args.gateway_src.resolve()
        if not (GATEWAY_SRC / "proxy" / "__init__.py").exists():
            print(f"bench.py: no proxy package under {GATEWAY_SRC}", file=sys.stderr)
            return 2
        sys.path.insert(0, str(GATEWAY_SRC))  # the config keys we write must be that version's
    for tool in ("wrk", "nginx", "haproxy", "taskset", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench.py: {tool} not found; run tests/bench/run.sh, which installs it", file=sys.stderr)
            return 2
    os.environ["PATH"] += ":/usr/sbin"
    if len(os.sched_getaffinity(0)) < 2:
        print("bench.py: needs 2 CPUs (target on core 0, load on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # this orchestrator stays off the target's core
    # Also when started from a script with `&`, where SIGINT arrives ignored: Ctrl-C must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="arp-bench-"))
    started = time.monotonic()
    aborted = False
    bench = Bench(args, workdir)
    results = bench.results
    results.update({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "mode": "quick" if args.quick else "full", "environment": environment(),
                    "config": {k: v for k, v in vars(args).items()}})
    env = results["environment"]
    print(f"arp-gateway bench ({results['mode']}): nproc {env['nproc']}, {env['cpu_model']}; workdir {workdir}",
          flush=True)
    try:
        bench.start_fixture()
        bench.start_targets()
        bench.throughput()
        bench.pairs()
        if "profile" not in args.skip:
            bench.profile()
        if "fixed-rate" not in args.skip:
            bench.fixed_rate()
        # The load targets are done: stop them so the streaming section has the machine to itself.
        bench.procs.stop_named({"haproxy", "gw_auth", "gw_noauth", "gw_nometrics", "gw_runs", "gw_workers2", "jarvis",
                                "token-endpoint"})
        if "workers" not in args.skip:
            bench.scaling()
        if "startup" not in args.skip:
            bench.startup()
        if "streaming" not in args.skip:
            bench.streaming()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything this run started", file=sys.stderr)
        bench.procs.stop_all()
        return 130
    except BenchError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        bench.note(f"aborted: {exc}")
        aborted = True
    finally:
        bench.procs.stop_all()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = time.monotonic() - started
    results["verdicts"] = verdicts(results)
    print_table(results)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (RESULTS_DIR / "latest.md").write_text(render(results))
    print(f"\nwrote {RESULTS_DIR / 'latest.md'} and latest.json; wall time {results['wall_s']:.0f} s")
    # The exit status says whether the bench ran (what CI's smoke checks), not whether the
    # gateway met its targets: those are the verdicts above, on a machine that may be noisy.
    gateway = results["sections"].get("throughput", {}).get("gw_auth", {})
    if aborted or not gateway or gateway.get("unavailable"):
        print("bench.py: the run is incomplete (see the notes above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
