"""`arp-gateway`: serve, check-config, dev and token.

Exit codes: 0 success, 2 unusable configuration or arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from . import __version__, devcoordinator, devissuer
from .config import ConfigError, GatewayConfig, load_config, redacted
from .logs import setup_logging
from .server import run as run_on_loop
from .server import run_gateway, serve

# Package data, so `arp-gateway dev` works from a wheel as well as from a checkout.
DEV_CONFIG = Path(__file__).resolve().parent / "data" / "dev.yaml"
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arp-gateway", description="ARP Standard Run Gateway")
    p.add_argument("--version", action="version", version=f"arp-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", type=Path, help="YAML configuration file")
    s.add_argument("--host", help="listen address (overrides listen.host)")
    s.add_argument("--port", type=int, help="listen port (overrides listen.port)")

    c = sub.add_parser("check-config", help="validate a configuration and print it, secrets redacted")
    c.add_argument("--config", type=Path, help="YAML configuration file")

    d = sub.add_parser("dev", help="gateway + dev coordinator + dev issuer on loopback")
    d.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    d.add_argument("--auth", choices=("required", "optional", "disabled"), default="optional")
    d.add_argument("--issuer-port", type=int, default=devissuer.DEFAULT_PORT)
    d.add_argument("--step-delay", type=float, default=0.5, help="seconds between a dev run's events")
    d.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")

    t = sub.add_parser("token", help="print a token from the running `arp-gateway dev` issuer")
    t.add_argument("--sub", default="dev-user")
    t.add_argument("--aud", default=devissuer.DEFAULT_AUDIENCE)
    t.add_argument("--scope")
    t.add_argument("--ttl", type=int, default=3600)
    t.add_argument("--issuer", default=f"http://127.0.0.1:{devissuer.DEFAULT_PORT}")
    return p


def _config(path: Path | None, flags: dict) -> GatewayConfig | None:
    try:
        return load_config(path, os.environ, flags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        cfg = _config(args.config, {})
        if cfg is None:
            return EXIT_CONFIG
        print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
        return 0
    if args.command == "serve":
        cfg = _config(args.config, {"listen.host": args.host, "listen.port": args.port})
        if cfg is None:
            return EXIT_CONFIG
        setup_logging(cfg.logging.level)
        return serve(cfg)
    if args.command == "dev":
        return _dev(args)
    return _token(args)


def _dev(args: argparse.Namespace) -> int:
    async def run() -> int:
        coordinator, coordinator_url = await devcoordinator.start(step_delay_s=args.step_delay)
        try:
            issuer_runner, issuer = await devissuer.start(port=args.issuer_port)
        except OSError as exc:
            await coordinator.cleanup()
            print(f"cannot listen for the dev issuer on 127.0.0.1:{args.issuer_port}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        flags = {"listen.host": "127.0.0.1", "listen.port": args.port, "upstream.url": coordinator_url,
                 "auth.mode": args.auth,
                 "auth.issuers": [{"issuer": issuer.url, "audiences": [devissuer.DEFAULT_AUDIENCE]}]}
        cfg = _config(DEV_CONFIG, flags)
        if cfg is None:
            return EXIT_CONFIG
        setup_logging(cfg.logging.level)

        def announce(url: str) -> None:
            print(_banner(url, coordinator_url, issuer.url, args), file=sys.stderr, flush=True)

        try:
            await run_gateway(cfg, on_ready=announce)
        finally:
            await issuer_runner.cleanup()
            await coordinator.cleanup()
        return 0

    try:
        return run_on_loop(run(), args.event_loop)
    except OSError as exc:
        print(f"arp-gateway dev: {exc}", file=sys.stderr)
        return 1


def _banner(url: str, coordinator: str, issuer: str, args: argparse.Namespace) -> str:
    body = ('{"root_node_type_ref": {"node_type_id": "jarvis.composite.planner.general", '
            '"version": "0.3.3"}, "input": {"goal": "Generate a UUID, then return it."}}')
    return f"""
ARP Run Gateway (dev)       {url}    auth: {args.auth}
Dev Run Coordinator         {coordinator}    (in-memory, dev only)
Dev token issuer            {issuer}    (ephemeral key, dev only)

Start a run:
  curl -sS -X POST {url}/v1/runs -H 'Content-Type: application/json' -d '{body}'
With a token:
  TOKEN="$(arp-gateway token)"
  curl -sS -X POST {url}/v1/runs -H 'Content-Type: application/json' -H "Authorization: Bearer $TOKEN" -d '{body}'
Stream its events:
  curl -sS -N {url}/v1/runs/<run_id>/events

Ctrl-C to stop.
"""


def _token(args: argparse.Namespace) -> int:
    payload = {"sub": args.sub, "aud": args.aud, "ttl": args.ttl}
    if args.scope:
        payload["scope"] = args.scope
    request = urllib.request.Request(args.issuer.rstrip("/") + "/dev/token", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            print(json.load(resp)["access_token"])
        return 0
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        print(f"arp-gateway token: no dev issuer answered at {args.issuer} ({exc}); "
              "is `arp-gateway dev` running?", file=sys.stderr)
        return 1
