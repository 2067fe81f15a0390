"""What the fleet-wide run-start limit costs: the redis backend against the local one, side by side.

Two gateways with `limits.run_start_rate` set so high that nothing is refused, one with
`backend: local` and one with `backend: redis` (a redis-server on loopback, no persistence), both
pinned to core 0; the open-loop client (clients.py) sends authenticated run starts at a fixed rate
from core 1, where the issuer, the nginx upstream and Redis also run. Rounds alternate which
backend goes first; the verdict is the median over rounds of the p50 difference (target: at
most +0.2 ms at 1,000 req/s).

    .venv/bin/python tests/bench/ratelimit_cost.py                 # 3 rounds x 3,000 requests at 1,000/s
    .venv/bin/python tests/bench/ratelimit_cost.py --rounds 1 --count 1000

Needs what run.sh installs (nginx, wrk's siblings) and redis-server; everything listens on 127.0.0.1
and is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402 - the bench directory is put on the path just above
    BENCH_DIR,
    LOAD_CPU,
    TARGET_CPU,
    Bench,
    BenchError,
    _on_sigterm,
    free_port,
    gateway_config,
    parse_args,
    port_open,
    wait_until,
)

NO_LIMIT = {"per_second": 1_000_000, "burst": 1_000_000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop run starts per second")
    p.add_argument("--count", type=int, default=3000, help="run starts per round and backend")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--redis-cpu", default=LOAD_CPU, help=f"the core(s) Redis runs on (default {LOAD_CPU}, with the "
                   f"load; {TARGET_CPU}: beside the gateway, off the busy load core)")
    args = p.parse_args(argv)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("ratelimit_cost.py: redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="arp-bench-redis-"))
    bench = Bench(parse_args(["--quick"]), workdir)
    procs = bench.procs
    results: dict[str, list[dict]] = {"local": [], "redis": []}
    try:
        bench.start_fixture()
        redis_port = free_port()
        proc = procs.start("redis", [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"], args.redis_cpu)
        wait_until("redis", lambda: port_open(redis_port), 10, proc, procs, "redis")
        upstream = f"http://127.0.0.1:{bench.ports['upstream']}"
        urls = {}
        for backend in ("local", "redis"):
            port = free_port()
            cfg = gateway_config(port, upstream, bench.issuer)
            cfg["limits"] = {"run_start_rate": {**NO_LIMIT, "backend": backend}}
            if backend == "redis":
                cfg["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
            proc = bench.start_gateway(f"gw_{backend}", cfg, TARGET_CPU)
            bench.wait_gateway_ready(f"gw_{backend}", port, proc)
            urls[backend] = f"http://127.0.0.1:{port}/v1/runs"
        for i in range(args.rounds):
            for backend in ("local", "redis") if i % 2 == 0 else ("redis", "local"):
                text = procs.run(f"openloop-{backend}-{i}", [
                    sys.executable, str(BENCH_DIR / "clients.py"), "openloop", "--url", urls[backend],
                    "--token-file", str(bench.token_file), "--rate", str(args.rate), "--count", str(args.count),
                    "--warmup", str(args.count // 10)], LOAD_CPU, timeout=args.count / args.rate * 1.1 + 60)
                r = json.loads(text.strip().splitlines()[-1])
                results[backend].append(r)
                print(f"round {i + 1} {backend:5s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                      f"statuses {r['statuses']}", flush=True)
    except (BenchError, KeyboardInterrupt) as exc:
        print(f"ratelimit_cost.py: {exc or 'interrupted'}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    diffs = [r["p50_ms"] - l["p50_ms"] for l, r in zip(results["local"], results["redis"], strict=True)]  # noqa: E741
    median = statistics.median(diffs)
    print(f"p50 redis - local per round: {', '.join(f'{d:+.3f}' for d in diffs)} ms; median {median:+.3f} ms "
          f"(target <= +0.2 ms at {args.rate:.0f}/s): {'ok' if median <= 0.2 else 'OVER'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
