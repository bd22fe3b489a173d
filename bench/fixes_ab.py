"""What-if: the latency fixes the benchmarks point at, applied from the outside (monkeypatches in
wrapper processes; nothing under src/ is changed), measured A/B/C interleaved on warm local servers.

  A  as is: server and CLI unchanged (server started through the same wrapper as B and C, untouched)
  B  server: listening socket created with proto IPPROTO_TCP, so asyncio sets TCP_NODELAY on every
     accepted connection (today sock.proto == 0, asyncio skips it, and Nagle + the client's delayed
     ACK stall every response written in two parts (headers, body) by ~40 ms on a reused connection)
  C  B + CLI: the process ends with os._exit after flushing (no interpreter teardown: ~80 ms); and,
     where the CLI still uses httpx, httpx.Client(verify=False) for http:// URLs (no CA bundle: ~50 ms)

Each case has its own DSTACK_HOME, server and runner. Cases per round: `dstack run hello` A B C,
then `dstack status` A B C.
Usage: python bench/fixes_ab.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DSTACK,
    PYTHON,
    env_for,
    fresh_home,
    interleaved,
    make_project,
    ms,
    print_table,
    run_timed,
    stats,
    write_results,
)
from trace_run import start_traced_server  # noqa: E402

WORKFLOWS = """workflows:
  - name: hello
    commands:
      - echo hi
"""

CLI_FIXED = r'''
import importlib.util, os, sys
if importlib.util.find_spec("dstack.api.http") is None:  # the CLI still talks through httpx
    import httpx
    _init = httpx.Client.__init__
    def __init__(self, *a, **kw):
        if str(kw.get("base_url", "")).startswith("http://"):
            kw.setdefault("verify", False)  # plain HTTP: no TLS, no CA bundle to load
        _init(self, *a, **kw)
    httpx.Client.__init__ = __init__
from dstack.cli.main import main
sys.argv = ["dstack", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    homes = {k: fresh_home(f"ab{k}") for k in "ABC"}
    envs = {k: env_for(h) for k, h in homes.items()}
    try:
        projs = {k: make_project(h / "project", WORKFLOWS) for k, h in homes.items()}
        for k in "ABC":
            start_traced_server(homes[k], envs[k], nodelay=k != "A")
        cli = {"A": [DSTACK], "B": [DSTACK], "C": [PYTHON, "-c", CLI_FIXED]}
        cases = {}
        for what, args in (("run", ["run", "hello"]), ("status", ["status"])):
            for k in "ABC":
                cases[f"{what}-{k}"] = ([*cli[k], *args], {"cwd": projs[k], "env": envs[k], "expect": None})
        cases = {k: (c, {**kw, "expect": b"hi"} if k.startswith("run") else kw) for k, (c, kw) in cases.items()}
        print("warming up (servers, runners)...", flush=True)
        for cmd, kw in cases.values():
            for _ in range(3):
                run_timed(cmd, **kw)
        times = interleaved(cases, a.rounds)
    finally:
        for k in "ABC":
            subprocess.run([DSTACK, "server", "stop"], env=envs[k], capture_output=True, timeout=60)
            shutil.rmtree(homes[k], ignore_errors=True)
    st = {k: stats(v) for k, v in times.items()}
    rows = []
    for what in ("run", "status"):
        base = st[f"{what}-A"]["median"]
        for k, label in (("A", "as is"), ("B", "+ server TCP_NODELAY"), ("C", "+ CLI os._exit (+ verify=False if httpx)")):
            m = st[f"{what}-{k}"]["median"]
            ratios = [x / y for x, y in zip(times[f"{what}-{k}"], times[f"{what}-A"], strict=True)]
            rows.append({"command": f"dstack {what}{' hello' if what == 'run' else ''}", "case": f"{k}: {label}",
                         "median": ms(m), "p25-p75": f"{ms(st[f'{what}-{k}']['p25'])} - {ms(st[f'{what}-{k}']['p75'])}",
                         "vs A": f"{(m - base) * 1000:+.0f} ms" if k != "A" else "",
                         "round ratio": f"{statistics.median(ratios):.2f}x" if k != "A" else ""})
    print(f"\n{a.rounds} interleaved rounds:")
    print_table(rows, ["command", "case", "median", "p25-p75", "vs A", "round ratio"])
    write_results("fixes_ab", {"rounds": a.rounds, "cases": st, "table": rows})


if __name__ == "__main__":
    main()
