#!/usr/bin/env bash
# The one command that installs what the tests need and runs them, from a clean clone.
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/unit -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test.sh: $*" >&2; }

# --- system packages: Docker Engine, a static busybox for locally built test images, PostgreSQL (its programs
# only: the tests start a cluster of their own, tests/postgres.py; no service is started), systemd's tools ---
pkgs=()
command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || pkgs+=(postgresql)
command -v systemd-analyze >/dev/null 2>&1 || pkgs+=(systemd)  # `verify` of dstack-runner install's unit
[ -x /bin/busybox ] || pkgs+=(busybox-static)
python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1 || pkgs+=(python3.11-venv)
command -v unshare >/dev/null 2>&1 || pkgs+=(util-linux)
# a one-machine Slurm cluster and SSH servers in test hosts, started by the tests (tests/slurm.py, tests/sshd.py)
command -v slurmctld >/dev/null 2>&1 || pkgs+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || pkgs+=(munge)
[ -x /usr/sbin/sshd ] || pkgs+=(openssh-server)
# what the `code` provider's test builds code-server with (Node.js 20 itself is not Debian 12's: without it,
# tests/e2e/test_code_provider.py skips its test that serves VS Code)
command -v c++ >/dev/null 2>&1 || pkgs+=(g++)
command -v make >/dev/null 2>&1 || pkgs+=(make)
command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
pkg-config --exists krb5-gssapi 2>/dev/null || pkgs+=(libkrb5-dev)
command -v rg >/dev/null 2>&1 || pkgs+=(ripgrep)
if [ "${#pkgs[@]}" -gt 0 ]; then
  # another apt run (e.g. a provisioning script) may hold the lock: wait for it
  for _ in $(seq 1 120); do
    fuser /var/lib/dpkg/lock-frontend /var/lib/apt/lists/lock >/dev/null 2>&1 || break
    sleep 2
  done
  log "installing ${pkgs[*]}"
  # no package may start its service (postgresql's would start a cluster on port 5432): invoke-rc.d asks
  # policy-rc.d, and 101 means "not now"; one that is there already (Docker images have one) is kept
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi

# --- Docker Engine: started in the background when it is not running ---
if ! docker info >/dev/null 2>&1; then
  if ! pgrep -x dockerd >/dev/null 2>&1; then
    log "starting dockerd (log: /tmp/dockerd.log)"
    setsid nohup dockerd >/tmp/dockerd.log 2>&1 </dev/null &
  fi
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
fi
if ! docker info >/dev/null 2>&1; then
  # a client newer than the engine may refuse to negotiate: pin the engine's API (Debian 12: 20.10)
  export DOCKER_API_VERSION=1.41
fi
if ! docker info >/dev/null 2>&1; then
  log "Docker Engine is not reachable after 60 s; see /tmp/dockerd.log"
  tail -n 20 /tmp/dockerd.log >&2 2>/dev/null || true
  exit 1
fi

# --- Python environment ---
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3.11 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
export PATH="$PWD/.venv/bin:$PATH"

# --- checks, then the tests ---
ruff check .
if ! imports=$(lint-imports 2>&1); then
  echo "$imports" >&2
  exit 1
fi
# all of tests/, unless the arguments name tests themselves (scripts/test.sh tests/unit -x)
targets=(tests)
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    targets=()
    break
  fi
done
set +e
python -m pytest -q "${targets[@]}" "$@"
rc=$?
set -e
exit "$rc"
