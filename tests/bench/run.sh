#!/usr/bin/env bash
# Side-by-side benchmark of the ARP Run Gateway (on demand; CI runs `--quick`).
#
#   bash tests/bench/run.sh            # full run: 3 interleaved rounds x 5 s, 1 GiB stream
#   bash tests/bench/run.sh --quick    # smoke: 1 round x 2 s, 32 MiB stream
#   bash tests/bench/run.sh --help     # every knob of bench.py
#
# Installs or checks its tools first: Debian wrk, nginx and haproxy (their
# daemons are kept from starting), JARVIS Run Gateway 0.3.8 in its own venv
# (tests/bench/.venv-jarvis) and py-spy in the project venv; then runs
# tests/bench/bench.py with the project venv's python. Results go to
# tests/bench/results/latest.{md,json}.
set -euo pipefail

BENCH_DIR="$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd)"
REPO_ROOT="$(cd -- "$BENCH_DIR/../.." && pwd)"
PROJECT_PY="$REPO_ROOT/.venv/bin/python"
JARVIS_VENV="$BENCH_DIR/.venv-jarvis"
JARVIS_VERSION="0.3.8"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'tests/bench/run.sh: ERROR: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

[[ -x "$PROJECT_PY" ]] ||
  die "no project venv at $REPO_ROOT/.venv (python3 -m venv .venv && .venv/bin/pip install -e .)"
"$PROJECT_PY" -c 'import proxy' 2>/dev/null || die "the project is not installed in .venv (.venv/bin/pip install -e .)"
command -v taskset >/dev/null || die "taskset not found (Debian package util-linux)"
for arg in "$@"; do  # --help needs no tools
  [[ $arg == -h || $arg == --help ]] && exec "$PROJECT_PY" "$BENCH_DIR/bench.py" --help
done

# --- Debian tools -----------------------------------------------------------
# Only their binaries are used: bench.py starts its own nginx/haproxy on
# loopback with generated configs. The packages' own daemons would listen on
# 0.0.0.0:80 and compete for the two cores, so the ones our install starts
# are stopped again; a daemon that was already running is somebody's and is
# left alone (with a warning: it is noise in every number).
daemon_pid() {  # pid of the packaged daemon of $1, if one is running
  local pidfile pid
  for pidfile in "/run/$1.pid" "/var/run/$1.pid"; do
    [[ -r "$pidfile" ]] || continue
    pid="$(head -n1 "$pidfile" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; return; fi
  done
}

missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx)
[[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
for name in nginx haproxy; do
  if [[ -n "$(daemon_pid "$name")" ]]; then
    log "WARNING: a $name daemon is already running here; it is left alone but may skew the numbers"
  fi
done
if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run as root or: apt-get install ${missing[*]}"
  log "apt-get install ${missing[*]}"
  # policy-rc.d answering 101 tells invoke-rc.d not to start services during
  # the install. Keep an existing one (Docker images ship exactly that) and
  # put back whatever was there afterwards.
  policy=/usr/sbin/policy-rc.d
  backup=""
  if [[ -e $policy ]] && ! grep -qx 'exit 101' "$policy"; then
    backup="$(mktemp)"; cp -p "$policy" "$backup"
  fi
  created=0
  if [[ ! -e $policy || -n $backup ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 0755 "$policy"; created=1
  fi
  rc=0
  timeout --kill-after=30 300 apt-get -o DPkg::Lock::Timeout=120 update </dev/null >&2 || rc=$?
  if ((rc == 0)); then
    timeout --kill-after=30 600 apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends \
      "${missing[@]}" </dev/null >&2 || rc=$?
  fi
  if [[ -n $backup ]]; then mv -f "$backup" "$policy"; elif ((created)); then rm -f "$policy"; fi
  # Should a daemon have started anyway (systemd ignores policy-rc.d), stop what this install started.
  for name in "${missing[@]}"; do
    [[ $name == wrk ]] && continue
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$name" 2>/dev/null; then
      log "stopping the $name service the package started"
      systemctl stop "$name" || true
    elif pid="$(daemon_pid "$name")" && [[ -n $pid ]]; then
      log "stopping the $name daemon the package started (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  ((rc == 0)) || die "apt-get install ${missing[*]} failed or timed out (exit $rc)"
fi

# --- JARVIS Run Gateway, isolated so its pins never touch the project venv ---
jarvis_installed() {
  local have
  have="$("$JARVIS_VENV/bin/python" -c \
    'import importlib.metadata as m; print(m.version("arp-jarvis-rungateway"))' 2>/dev/null || true)"
  [[ "$have" == "$JARVIS_VERSION" ]]
}
if ! jarvis_installed; then
  log "installing arp-jarvis-rungateway==$JARVIS_VERSION into tests/bench/.venv-jarvis"
  { [[ -x "$JARVIS_VENV/bin/python" ]] || python3 -m venv "$JARVIS_VENV"; } &&
    timeout --kill-after=30 600 "$JARVIS_VENV/bin/python" -m pip install -q \
      "arp-jarvis-rungateway==$JARVIS_VERSION" </dev/null >&2 \
    || log "WARNING: installing JARVIS failed; bench.py reports that target as n/a"
fi

# --- py-spy for the profile section (a wheel with the binary inside) ---------
if ! "$PROJECT_PY" -m pip show -q py-spy >/dev/null 2>&1; then
  log "pip install py-spy into the project venv"
  timeout --kill-after=30 300 "$PROJECT_PY" -m pip install -q py-spy </dev/null >&2 \
    || log "WARNING: installing py-spy failed; the profile section will be n/a"
fi

cd "$REPO_ROOT"
exec "$PROJECT_PY" "$BENCH_DIR/bench.py" "$@"
