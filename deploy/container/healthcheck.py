"""The image's HEALTHCHECK: exit 0 when the running gateway's /livez answers 200, else 1.

The port is not baked into the image: a container started with another configuration (a mounted
file, `--port`, ARP_* variables) would otherwise be reported unhealthy, or a stranger on 9464 healthy.
So the address is resolved from the gateway process itself (PID 1, or the pid given as the argument):
its command line and environment, through the gateway's own configuration loader.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

from proxy.runtime.cli import parse_args
from proxy.settings.config import load_config


def _livez_url(pid: str) -> str:
    proc = Path("/proc") / pid
    argv = (proc / "cmdline").read_bytes().decode().split("\0")[:-1]
    env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode().split("\0") if "=" in item)
    args = parse_args(argv[argv.index("serve"):])
    config = args.config
    if config is not None and not config.is_absolute():
        config = Path(os.readlink(proc / "cwd")) / config
    cfg = load_config(config, env, {"listen.host": args.host, "listen.port": args.port})
    # /livez is on the ops listener when there is one, else on the main listener.
    if cfg.metrics.enabled and cfg.metrics.port != 0:
        host, port = cfg.metrics.host, cfg.metrics.port
    else:
        host, port = cfg.listen.host, cfg.listen.port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/livez" if ":" in host else f"http://{host}:{port}/livez"


def main(argv: list[str]) -> int:
    try:
        with urllib.request.urlopen(_livez_url(argv[1] if len(argv) > 1 else "1"), timeout=2) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # any failure is "unhealthy"; the reason goes to `docker inspect`
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
