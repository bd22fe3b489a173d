"""Where the time of a warm `dstack run WORKFLOW` goes, seen from the CLI: a timeline of one run.

Runs the CLI in this process (as `dstack run` would) with its HTTP requests, subprocesses (git) and
imports timed, on a fresh local server warmed up first. Prints each event's start offset and duration,
and per-phase medians over several runs. Not a benchmark with a target: the evidence behind one.
Usage: python bench/trace_run.py [--workflow hello|dhello] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DSTACK, PYTHON, local_server_home, make_project, run_timed, write_results  # noqa: E402
from run_overhead import WORKFLOWS  # noqa: E402

CHILD = r'''
import json, os, subprocess, sys, time
T0 = float(os.environ["TRACE_T0"])
events = []
def rec(kind, what, t, dt): events.append((kind, what, round((t - T0) * 1000, 1), round(dt * 1000, 1)))
t_imp = time.perf_counter()
try:  # the CLI's own small HTTP client, where it has one; else httpx
    import dstack.api.http as dhttp
    orig_req = dhttp.HttpClient.request
    def request(self, method, path, params=None, **kw):
        t = time.perf_counter()
        try:
            return orig_req(self, method, path, params=params, **kw)
        finally:
            q = "&".join(f"{k}={v}" for k, v in (params or {}).items())
            rec("cli", f"{method} {path}{'?' + q if q else ''}", t, time.perf_counter() - t)
    dhttp.HttpClient.request = request
except ImportError:
    import httpx
    orig_send = httpx.Client.send
    def send(self, request, **kw):
        t = time.perf_counter()
        try:
            return orig_send(self, request, **kw)
        finally:
            q = request.url.query.decode() if request.url.query else ""
            rec("cli", f"{request.method} {request.url.path}{'?' + q if q else ''}", t, time.perf_counter() - t)
    httpx.Client.send = send
orig_run = subprocess.run
def run(args, *a, **kw):
    t = time.perf_counter()
    try:
        return orig_run(args, *a, **kw)
    finally:
        rec("cli:proc", " ".join(map(str, args))[:60], t, time.perf_counter() - t)
subprocess.run = run
import dstack.cli.main, dstack.cli.run, dstack.api.embedded, dstack.api.repo, dstack.config.workflows  # noqa
rec("cli:import", "dstack.cli.run and what it imports", t_imp, time.perf_counter() - t_imp)
sys.argv = ["dstack", "run", sys.argv[1]]
def _exit(code):  # the CLI ends with os._exit (no interpreter teardown); here the trace must be written first
    raise SystemExit(code)
os._exit = _exit
t = time.perf_counter()
code = 0
try:
    dstack.cli.main.main()
except SystemExit as e:
    code = e.code
rec("cli:main", "main() in total", t, time.perf_counter() - t)
with open(os.environ["TRACE_OUT"], "w") as f:
    json.dump({"events": events, "code": code}, f)
'''


SERVER = r'''
import json, os, sys, time
from dstack.server import app as appmod, main as mainmod
out = open(os.environ["TRACE_SERVER_OUT"], "a", buffering=1)
orig = appmod.create_app
def create_app(settings, on_ready=None):
    app = orig(settings, on_ready)
    async def traced(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        t = time.perf_counter()
        status = []
        async def send2(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            await send(msg)
        try:
            await app(scope, receive, send2)
        finally:
            q = scope.get("query_string", b"").decode()
            out.write(json.dumps([t, time.perf_counter() - t, scope["method"],
                                  scope["path"] + ("?" + q if q else ""), status[0] if status else None]) + "\n")
    return traced
appmod.create_app = create_app
if os.environ.get("TRACE_NODELAY"):
    # experiment: the listening socket as socket.create_server makes it (proto IPPROTO_TCP), so that
    # asyncio sets TCP_NODELAY on accepted connections (it checks sock.proto == IPPROTO_TCP)
    import socket
    _socket = socket.socket
    def tcp_socket(family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family == socket.AF_INET and type == socket.SOCK_STREAM and proto in (-1, 0):
            proto = socket.IPPROTO_TCP
        return _socket(family, type, proto, fileno)
    mainmod.socket = type("m", (), {**{k: getattr(socket, k) for k in dir(socket) if not k.startswith("__")},
                                     "socket": staticmethod(tcp_socket)})
sys.argv = ["dstack-server", "--home", os.environ["DSTACK_HOME"]]
mainmod.main()
'''


def start_traced_server(home: Path, env: dict, nodelay: bool = False) -> subprocess.Popen:
    """The local server, as `dstack` would start it, but with every HTTP request it serves timed."""
    (home / "server").mkdir(parents=True, exist_ok=True)
    log = open(home / "server" / "server.log", "ab")
    proc = subprocess.Popen([PYTHON, "-c", SERVER], env={**env, "TRACE_SERVER_OUT": str(home / "requests.jsonl"),
                                 **({"TRACE_NODELAY": "1"} if nodelay else {})},
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if json.loads((home / "server" / "server.json").read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise RuntimeError("traced server did not start")


def server_events(home: Path, t0: float, t1: float) -> list:
    events = []
    for line in (home / "requests.jsonl").read_text().splitlines():
        t, dt, method, path, status = json.loads(line)
        if t0 <= t <= t1:
            runner = path.startswith("/api/runners/") or (method == "GET" and path.startswith("/api/code/"))
            who = "runner" if runner else "cli"
            events.append(("srv:" + who, f"{method} {path} -> {status}", round((t - t0) * 1000, 1),
                           round(dt * 1000, 1)))
    return events


def trace_once(workflow: str, proj: Path, env: dict, out: Path) -> dict:
    t0 = time.perf_counter()
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
    e = {**env, "TRACE_T0": repr(t0), "TRACE_OUT": str(out)}
    p = subprocess.run([PYTHON, "-c", CHILD, workflow], cwd=proj, env=e, capture_output=True)
    total = time.perf_counter() - t0
    data = json.loads(out.read_text())
    data["events"] = sorted(data["events"] + server_events(out.parent, t0, t0 + total), key=lambda e: e[2])
    data["total_ms"] = round(total * 1000, 1)
    data["stderr"] = p.stderr.decode(errors="replace")
    return data


def normal(what: str) -> str:
    """An event's name without what changes from run to run (ids, names, query)."""
    what = re.sub(r"/(jobs|code)/[^/?]+", r"/\1/ID", what.split("?")[0].split(" -> ")[0])
    what = re.sub(r"/runs/[^/?]+", "/runs/NAME", what)
    return re.sub(r"/runners/[^/]+/", "/runners/NAME/", what)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workflow", default="hello")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--nodelay", action="store_true",
                    help="experiment: serve with TCP_NODELAY on accepted connections (see README)")
    a = ap.parse_args()
    with local_server_home("trace") as (home, env):
        proj = make_project(home / "project", WORKFLOWS)
        start_traced_server(home, env, a.nodelay)
        for _ in range(3):
            run_timed([DSTACK, "run", a.workflow], cwd=proj, env=env)
        traces = [trace_once(a.workflow, proj, env, home / f"trace{i}.json") for i in range(a.runs)]
        server_log = (home / "server" / "server.log").read_text(errors="replace")[-1500:]
    for i, tr in enumerate(traces):
        print(f"\n--- run {i + 1}: {tr['total_ms']:.0f} ms wall (exit {tr['code']}) ---")
        print(f"{'start':>8s} {'took':>8s}  event (cli: as the CLI saw it; srv: as the server served it)")
        for kind, what, start, took in tr["events"]:
            print(f"{start:8.1f} {took:8.1f}  {kind:10s} {what}")
    # medians by event (the n-th event of a kind+name across runs)
    by: dict[str, list[float]] = {}
    for tr in traces:
        seen: dict[str, int] = {}
        for kind, what, _start, took in tr["events"]:
            key = f"{kind} {normal(what)}"
            seen[key] = seen.get(key, 0) + 1
            by.setdefault(f"{key} #{seen[key]}", []).append(took)
    print(f"\nmedian over {len(traces)} runs (ms):")
    for k, v in by.items():
        print(f"  {statistics.median(v):8.1f}  {k}")
    print(f"  {statistics.median(t['total_ms'] for t in traces):8.1f}  wall, process start to exit")
    write_results(f"trace_run_{a.workflow}{'_nodelay' if a.nodelay else ''}", {"traces": traces,
                                              "medians_ms": {k: statistics.median(v) for k, v in by.items()},
                                              "server_log_tail": server_log, "load": os.getloadavg()})


if __name__ == "__main__":
    main()
