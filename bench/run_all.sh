#!/usr/bin/env bash
# Runs the latency benchmarks; results in bench/results/*.json. `--experiments` also runs a traced
# `dstack run` (trace_run.py) and the Docker executor alone against `docker run --rm` (trace_docker.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
docker info >/dev/null 2>&1 || { echo "Docker Engine is not reachable (start dockerd)" >&2; exit 1; }
docker image inspect dstack-test/busybox:latest >/dev/null 2>&1 || {
  echo "image dstack-test/busybox:latest is missing (see bench/README.md to build it)" >&2; exit 1; }
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== help_latency";   "$PY" bench/help_latency.py
echo; echo "== run_overhead"; "$PY" bench/run_overhead.py
echo; echo "== status_latency"; "$PY" bench/status_latency.py
echo; echo "== artifact_transfer"; "$PY" bench/artifact_transfer.py --rounds 7
echo; echo "== submit_to_start"; "$PY" bench/submit_to_start.py
echo; echo "== idle_runners"; "$PY" bench/idle_runners.py
echo; echo "== cold_start"; "$PY" bench/cold_start.py
echo; echo "== autoscaler_decision"; "$PY" bench/autoscaler_decision.py
if [[ "${1:-}" == "--experiments" ]]; then
  echo; echo "== trace_run"; "$PY" bench/trace_run.py --runs 5 | tail -40
  echo; echo "== trace_docker"; "$PY" bench/trace_docker.py
fi
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
