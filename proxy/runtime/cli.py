"""`arp-gateway`: serve, check-config, dev and token.

Exit codes: 0 success, 2 unusable configuration or arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import logging
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..observability.logs import setup_logging
from ..settings.config import DEV_ISSUER_AUDIENCE as ISSUER_AUDIENCE
from ..settings.config import DEV_ISSUER_PORT as ISSUER_PORT
from ..settings.config import ConfigError, GatewayConfig, config_warnings, load_config, redacted
from .server import run as run_on_loop
from .server import run_gateway, serve

# Package data, so `arp-gateway dev` and `check-config --example` work from a wheel as well as from a checkout.
DATA = Path(__file__).resolve().parents[1] / "data"
DEV_CONFIG = DATA / "dev.yaml"
EXAMPLES = {"gateway": DATA / "gateway.example.yaml", "local-port-forward": DATA / "local-port-forward.yaml"}
EXIT_CONFIG = 2
log = logging.getLogger("proxy.settings.config")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's own, so misuse of one prints that one's usage."""
    p = argparse.ArgumentParser(prog="arp-gateway", description="ARP Standard Run Gateway")
    p.add_argument("--version", action="version", version=f"arp-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,check-config,dev,token}")

    s = sub.add_parser("serve", help="run the gateway", description="Run the gateway.")
    _config_arguments(s)
    s.add_argument("--host", help="listen address (overrides listen.host)")
    s.add_argument("--port", type=int, help="listen port (overrides listen.port)")

    c = sub.add_parser(
        "check-config", help="validate a configuration and print it, secrets redacted",
        description="Validate a configuration (YAML, then the environment) and print the resolved "
        "configuration with secrets redacted. Exit 2 with one `key.path: problem` line per problem. "
        "--example prints the shipped example configuration instead.")
    _config_arguments(c)
    c.add_argument("--example", nargs="?", const="gateway", choices=sorted(EXAMPLES),
                   help="print a shipped example configuration (default: gateway) and exit")

    d = sub.add_parser(
        "dev", help="gateway + dev coordinator + dev issuer on loopback",
        description="Run the gateway on loopback in front of an in-memory dev Run Coordinator, with a dev "
        "token issuer (ephemeral key). Dev only: never expose it.")
    d.add_argument("--port", type=int, default=8080, help="gateway port (default 8080; 0: any free port)")
    d.add_argument("--metrics-port", type=int, default=9464,
                   help="port of /metrics, /livez, /readyz (default 9464; 0: any free port)")
    d.add_argument("--auth", choices=("required", "optional", "disabled"), default="optional",
                   help="auth.mode: required (every run call needs a dev issuer token), optional (default: "
                   "no token is the anonymous principal, a token sent must be valid), disabled (no checks)")
    d.add_argument("--issuer-port", type=int, default=ISSUER_PORT,
                   help=f"port of the dev token issuer on 127.0.0.1 (default {ISSUER_PORT}; 0: any free port); "
                   f"`arp-gateway token --issuer http://127.0.0.1:PORT` mints from it")
    d.add_argument("--step-delay", type=float, default=0.5, help="seconds between a dev run's events")
    d.add_argument("--runs", choices=("any", "owner"), default="any",
                   help="runs.access: any (default: every caller acts on every run), or owner (each run is "
                   "bound to the token that started it, and another subject's get, cancel and events are 404)")
    d.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")

    t = sub.add_parser(
        "token", help="print an access token: from the running `arp-gateway dev` issuer, or with --client-id "
        "from a real IdP by the OAuth 2.0 client-credentials grant",
        description="Without --client-id: mint a token from the running `arp-gateway dev` issuer. "
        "With --client-id and --client-secret-file: get one from the IdP at --issuer by the OAuth 2.0 "
        "client-credentials grant (token endpoint from OIDC discovery). The token goes to stdout.")
    t.add_argument("--issuer", default=f"http://127.0.0.1:{ISSUER_PORT}",
                   help="the dev issuer, or the IdP's issuer URL (discovery at /.well-known/openid-configuration)")
    t.add_argument("--aud", "--audience", dest="aud", help="audience of the token")
    t.add_argument("--scope", help="space-separated scopes")
    t.add_argument("--sub", default="dev-user", help="subject (dev issuer only)")
    t.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (dev issuer only)")
    t.add_argument("--client-id", help="OAuth 2.0 client id: use the client-credentials grant")
    t.add_argument("--client-secret-file", type=Path,
                   help="file holding the client secret (never passed on the command line)")
    return p, {"serve": s, "check-config": c, "dev": d, "token": t}


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", type=Path, metavar="CONFIG", help="YAML configuration file")
    parser.add_argument("--config", type=Path, help="YAML configuration file (the same as CONFIG)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    top, subs = _parsers()
    args, extra = top.parse_known_args(argv)
    own = subs[args.command]
    if extra:
        # Without this, argparse blames the top-level command and prints its usage.
        own.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "path"):
        if args.path is not None and args.config is not None:
            own.error("give the configuration file once: CONFIG or --config, not both")
        args.config = args.config or args.path
    if getattr(args, "example", None) and args.config is not None:
        own.error("--example prints the shipped example; it takes no CONFIG")
    return args


def _config(path: Path | None, flags: dict) -> GatewayConfig | None:
    try:
        return load_config(path, os.environ, flags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "check-config":
        if args.example:
            print(EXAMPLES[args.example].read_text(encoding="utf-8"), end="")
            return 0
        cfg = _config(args.config, {})
        if cfg is None:
            return EXIT_CONFIG
        for warning in config_warnings(cfg):
            print(f"config warning: {warning}", file=sys.stderr)
        print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
        return 0
    if args.command == "serve":
        cfg = _config(args.config, {"listen.host": args.host, "listen.port": args.port})
        if cfg is None:
            return EXIT_CONFIG
        setup_logging(cfg.logging.level)
        for warning in config_warnings(cfg):
            log.warning("configuration: %s", warning, extra={"event": "config_warning"})
        return serve(cfg)
    if args.command == "dev":
        return _dev(args)
    return _token(args)


def _port_taken(port: int) -> str | None:
    """Why 127.0.0.1:port cannot be listened on (None: free), tried the way the listeners bind."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return None


def _dev(args: argparse.Namespace) -> int:
    ports = [("--port", args.port), ("--metrics-port", args.metrics_port), ("--issuer-port", args.issuer_port)]
    for flag, port in ports:
        if not 0 <= port <= 65535:
            print(f"arp-gateway dev: {flag} {port} is not a TCP port (0-65535)", file=sys.stderr)
            return EXIT_CONFIG
    for flag, port in ports:
        reason = _port_taken(port)
        if reason is not None:
            print(f"arp-gateway dev: cannot listen on 127.0.0.1:{port} ({reason}); pass another {flag}",
                  file=sys.stderr)
            return 1

    from ..dev import coordinator as dev_coordinator  # dev-only: imported by `dev` alone
    from ..dev import issuer as dev_issuer

    async def run() -> int:
        coordinator, coordinator_url = await dev_coordinator.start(step_delay_s=args.step_delay)
        try:
            issuer_runner, issuer = await dev_issuer.start(port=args.issuer_port)
        except OSError as exc:
            await coordinator.cleanup()
            print(f"cannot listen for the dev issuer on 127.0.0.1:{args.issuer_port}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        flags = {"listen.host": "127.0.0.1", "listen.port": args.port, "upstream.url": coordinator_url,
                 "metrics.host": "127.0.0.1", "metrics.port": args.metrics_port, "auth.mode": args.auth,
                 "auth.issuers": [{"issuer": issuer.url, "audiences": [ISSUER_AUDIENCE]}]}
        if args.runs == "owner":
            flags.update({"runs.bind_identity": True, "runs.access": "owner"})
        cfg = _config(DEV_CONFIG, flags)
        if cfg is None:
            await issuer_runner.cleanup()
            await coordinator.cleanup()
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
        # Lost a race for a port checked free above: name the flags that choose them.
        print(f"arp-gateway dev: cannot listen ({exc.strerror or exc}); pass another --port or --metrics-port",
              file=sys.stderr)
        return 1


def _banner(url: str, coordinator: str, issuer: str, args: argparse.Namespace) -> str:
    metrics = (f"http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port
               else "an ephemeral port (see the `gateway listening` log line)")
    body = ('{"root_node_type_ref": {"node_type_id": "jarvis.composite.planner.general", '
            '"version": "0.3.3"}, "input": {"goal": "Generate a UUID, then return it."}}')
    return f"""
ARP Run Gateway (dev)       {url}    auth: {args.auth}
Metrics and probes          {metrics}
Dev Run Coordinator         {coordinator}    (in-memory, dev only)
Dev token issuer            {issuer}    (ephemeral key, dev only)

Start a run:
  curl -sS -X POST {url}/v1/runs -H 'Content-Type: application/json' -d '{body}'
With a token:
  TOKEN="$(arp-gateway token)"
  curl -sS -X POST {url}/v1/runs -H 'Content-Type: application/json' -H "Authorization: Bearer $TOKEN" -d '{body}'
Stream its events:
  curl -sS -N {url}/v1/runs/<run_id>/events
{_owner_demo(url, body) if args.runs == "owner" else ""}
Ctrl-C to stop.
"""


def _owner_demo(url: str, body: str) -> str:
    return f"""
Runs belong to their callers (--runs owner): two subjects, and the second one's 404 on the first one's run:
  ALICE="$(arp-gateway token --sub alice)"; BOB="$(arp-gateway token --sub bob)"
  RUN=$(curl -sS -X POST {url}/v1/runs -H 'Content-Type: application/json' -H "Authorization: Bearer $ALICE" \\
        -d '{body}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
  curl -sS {url}/v1/runs/$RUN -H "Authorization: Bearer $ALICE"    # 200: alice's run, run_context names her
  curl -sS {url}/v1/runs/$RUN -H "Authorization: Bearer $BOB"      # 404 run_not_found, as for no run at all
"""


def _token(args: argparse.Namespace) -> int:
    if args.client_id or args.client_secret_file:
        return _client_credentials(args)
    payload: dict[str, Any] = {"sub": args.sub, "aud": args.aud or ISSUER_AUDIENCE, "ttl": args.ttl}
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


class _TokenError(Exception):
    """One line for stderr, and the exit code: 2 for bad arguments, 1 for an IdP that did not deliver."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


IDP_TIMEOUT_S = 10.0


def _client_credentials(args: argparse.Namespace) -> int:
    """OAuth 2.0 client credentials (RFC 6749 section 4.4) against the IdP's discovered token endpoint.

    The secret is read from a file and sent only to the token endpoint; it is never printed or logged,
    and neither is the IdP's error body beyond its OAuth `error` code."""
    try:
        token = _fetch_client_credentials_token(args)
    except _TokenError as exc:
        print(f"arp-gateway token: {exc}", file=sys.stderr)
        return exc.code
    print(token)
    return 0


def _fetch_client_credentials_token(args: argparse.Namespace) -> str:
    if not args.client_id:
        raise _TokenError("--client-secret-file needs --client-id", EXIT_CONFIG)
    if args.client_secret_file is None:
        raise _TokenError("--client-id needs --client-secret-file (the secret is never taken on the command line)",
                          EXIT_CONFIG)
    try:
        secret = args.client_secret_file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise _TokenError(f"--client-secret-file: cannot read {args.client_secret_file}: {reason}",
                          EXIT_CONFIG) from None
    if not secret:
        raise _TokenError(f"--client-secret-file: {args.client_secret_file} is empty", EXIT_CONFIG)
    issuer = args.issuer.rstrip("/")
    parts = urllib.parse.urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _TokenError(f"--issuer: not an http(s) URL: {args.issuer!r}", EXIT_CONFIG)

    discovery_url = issuer + "/.well-known/openid-configuration"
    status, discovery = _get_json(urllib.request.Request(discovery_url, headers={"Accept": "application/json"}),
                                  "OIDC discovery")
    if status != 200 or not isinstance(discovery, dict):
        raise _TokenError(f"OIDC discovery at {discovery_url} answered HTTP {status}"
                          f"{'' if status != 200 else ' without a JSON object'}")
    endpoint = discovery.get("token_endpoint")
    if not isinstance(endpoint, str) or urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise _TokenError(f"OIDC discovery at {discovery_url} names no token_endpoint")

    form = {"grant_type": "client_credentials"}
    if args.scope:
        form["scope"] = args.scope
    if args.aud:
        # `audience` is what Auth0, Okta and Keycloak (with an audience mapper) read; `aud` is the
        # oauth2-mock-server spelling. An IdP ignores the parameter it does not know.
        form["audience"] = form["aud"] = args.aud
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    methods = discovery.get("token_endpoint_auth_methods_supported")
    if not isinstance(methods, list) or "client_secret_basic" in methods:
        # RFC 6749 section 2.3.1: the default, with id and secret form-urlencoded inside Basic.
        pair = f"{urllib.parse.quote(args.client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form.update(client_id=args.client_id, client_secret=secret)
    request = urllib.request.Request(endpoint, data=urllib.parse.urlencode(form).encode(), headers=headers,
                                     method="POST")
    status, body = _get_json(request, "the token endpoint")
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        detail = f" ({error})" if isinstance(error, str) and error.replace("_", "").isalnum() else ""
        raise _TokenError(f"the token endpoint {endpoint} refused the client credentials: HTTP {status}{detail}")
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise _TokenError(f"the token endpoint {endpoint} answered without an access_token")
    return token


def _get_json(request: urllib.request.Request, what: str) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or None); _TokenError when nothing usable came back."""
    try:
        with urllib.request.urlopen(request, timeout=IDP_TIMEOUT_S) as resp:
            status, raw = resp.status, resp.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(64 * 1024)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _TokenError(f"{what} at {request.full_url} is unreachable: {reason}") from None
    try:
        return status, json.loads(raw)
    except ValueError:
        if status == 200:
            raise _TokenError(f"{what} at {request.full_url} answered with a body that is not JSON") from None
        return status, None
