"""`dstack --help` against `python -c pass` (the same interpreter), and what `dstack` imports.

Cases, interleaved round by round (A B, A B, ...):
  dstack-help   `dstack --help`
  python-pass   `python -c pass`
Target: dstack --help median < 0.15 s.

Then `python -X importtime` (median over a few runs, per module) of:
  `dstack --help`, `dstack status` (warm local server, empty DB) and `dstack run hello -d`
  (submit only; warm server): the top 10 imports by cumulative and by self time, so that it shows
what to make lazy.
Usage: python bench/help_latency.py [--rounds 21] [--importtime-runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DSTACK,
    PYTHON,
    interleaved,
    local_server_home,
    make_project,
    ms,
    print_table,
    run_timed,
    stats,
    verdict,
    write_results,
)

TARGET_S = 0.15
WORKFLOWS = """workflows:
  - name: hello
    commands:
      - echo hi
"""


def importtime(args: list[str], runs: int, **kw) -> dict:
    """Per module: median self and cumulative import time (ms) over `runs` runs of `python -X importtime`."""
    selfs: dict[str, list[float]] = {}
    cums: dict[str, list[float]] = {}
    depth: dict[str, int] = {}
    totals = []
    for _ in range(runs):
        p = subprocess.run([PYTHON, "-X", "importtime", *args], capture_output=True, stdin=subprocess.DEVNULL, **kw)
        if p.returncode != 0:
            raise RuntimeError(f"{args}: exit {p.returncode}\n{p.stderr.decode()[-2000:]}")
        total = 0.0
        for line in p.stderr.decode().splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            parts = line[len("import time:"):].split("|")
            s, c, raw = float(parts[0]), float(parts[1]), parts[2]
            name = raw.strip()
            depth[name] = (len(raw) - len(raw.lstrip()) - 1) // 2
            selfs.setdefault(name, []).append(s / 1000)
            cums.setdefault(name, []).append(c / 1000)
            if depth[name] == 0:
                total += c / 1000
        totals.append(total)
    med_self = {k: statistics.median(v) for k, v in selfs.items()}
    med_cum = {k: statistics.median(v) for k, v in cums.items()}
    top_cum = sorted(med_cum.items(), key=lambda kv: -kv[1])[:10]
    top_self = sorted(med_self.items(), key=lambda kv: -kv[1])[:10]
    return {
        "command": "dstack " + " ".join(args[1:]),
        "runs": runs,
        "modules": len(med_self),
        "total_import_ms": statistics.median(totals),
        "top_cumulative_ms": [{"module": k, "ms": round(v, 1), "depth": depth[k]} for k, v in top_cum],
        "top_self_ms": [{"module": k, "ms": round(v, 1)} for k, v in top_self],
    }


def print_importtime(r: dict) -> None:
    print(f"\n`{r['command']}`: {r['modules']} modules, {r['total_import_ms']:.0f} ms importing "
          f"(python -X importtime, median of {r['runs']}; importtime itself adds overhead)")
    print(f"  {'top 10 cumulative':<48s}   {'top 10 self':<40s}")
    for c, s in zip(r["top_cumulative_ms"], r["top_self_ms"], strict=True):
        left = f"{'  ' * c['depth']}{c['module']}"
        print(f"  {c['ms']:7.1f} ms  {left:<37s}   {s['ms']:7.1f} ms  {s['module']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--importtime-runs", type=int, default=5)
    a = ap.parse_args()

    cases = {"dstack-help": ([DSTACK, "--help"], {}), "python-pass": ([PYTHON, "-c", "pass"], {})}
    for _ in range(3):  # warm the page cache and .pyc files
        for cmd, kw in cases.values():
            run_timed(cmd, **kw)
    times = interleaved(cases, a.rounds)
    st = {k: stats(v) for k, v in times.items()}
    helps, base = st["dstack-help"]["median"], st["python-pass"]["median"]

    imports = [importtime([DSTACK, "--help"], a.importtime_runs)]
    with local_server_home("help") as (home, env):
        proj = make_project(home / "project", WORKFLOWS)
        run_timed([DSTACK, "status"], cwd=proj, env=env)  # starts the server
        run_timed([DSTACK, "run", "hello"], cwd=proj, env=env)  # and a runner
        imports.append(importtime([DSTACK, "status"], a.importtime_runs, cwd=proj, env=env))
        imports.append(importtime([DSTACK, "run", "hello", "-d"], a.importtime_runs, cwd=proj, env=env))

    rows = [{"measure": "dstack --help", "value": ms(helps), "baseline": f"python -c pass: {ms(base)}",
             "ratio": f"{helps / base:.1f}x", "target": f"< {TARGET_S} s", "result": verdict(helps, TARGET_S)}]
    print(f"{a.rounds} interleaved rounds, medians (p25-p75):")
    for k, s in st.items():
        print(f"  {k:12s} {ms(s['median']):>8s}  ({ms(s['p25'])} - {ms(s['p75'])})")
    for r in imports:
        print_importtime(r)
    print()
    print_table(rows, ["measure", "value", "baseline", "ratio", "target", "result"])
    write_results("help_latency", {
        "rounds": a.rounds, "cases": st, "importtime": imports,
        "checks": {"help_median_s": {"value": helps, "target_lt": TARGET_S, "pass": helps < TARGET_S,
                                     "baseline_python_pass_s": base, "ratio": helps / base}},
    })


if __name__ == "__main__":
    main()
