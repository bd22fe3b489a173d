"""The local server's memory while a run's code carries a large file: peak RSS minus idle RSS.

A real local server and runner; a project (a git repo with one commit and no remote: archive mode) holding
an untracked file of random bytes, rewritten before each run so that every run uploads a new code blob
(PUT /api/code/DIGEST) that the runner then fetches (GET). Cases, interleaved round by round (A B, A B, ...),
with a pause before each run:
  big    a 300 MB file
  small  a 30 MB file (the baseline)
The server's idle figure is its VmRSS after a warm-up run (a file of a few bytes), before any measured run.
Before each run its VmHWM is reset to its VmRSS of the moment (/proc/PID/clear_refs, "5"); after the run its
VmHWM is the run's peak. Reported per case: the median of peak - idle figure, and of the RSS the server keeps
after runs (memory it does not give back lifts its RSS for good). For information, the runner's growth
during a run (its processes' summed VmHWM minus their VmRSS before it) and the CLI's own peak (ru_maxrss of
`dstack run`, from wait4).

Target: the server's peak stays within 100 MB of its idle figure with the 300 MB file.
Usage: python bench/server_memory.py [--rounds 5] [--sizes 300,30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DSTACK, local_server_home, make_project, print_table, stats, verdict, write_results  # noqa: E402

WORKFLOWS = """workflows:
  - name: hello
    commands:
      - echo hi
"""
TARGET_MB = 100
SETTLE_S = 2.0  # the previous run's background work (the runner's clean-up) ends first
MB = 1 << 20


def vm(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            kids = [int(x) for x in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (16 * MB)):
            f.write(os.urandom(16 * MB))
        f.write(os.urandom(size % (16 * MB)))


def measured_run(cmd: list[str], cwd: Path, env: dict, server: int) -> dict:
    runners = [p for p in descendants(server) if p != server]
    before = vm(server, "VmRSS")
    reset_peak(server)
    runner_idle = 0
    for p in runners:
        runner_idle += vm(p, "VmRSS")
        reset_peak(p)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # its own peak RSS, which Popen.wait does not give
        p.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0 or b"hi" not in stdout:
        raise RuntimeError(f"{cmd} exited {p.returncode}:\n{stdout.decode(errors='replace')[-2000:]}"
                           f"\n{stderr.decode(errors='replace')[-2000:]}")
    peak = vm(server, "VmHWM")
    runner_peak = sum(vm(r, "VmHWM") for r in runners if Path(f"/proc/{r}").exists())
    return {"server_before": before, "server_peak": peak,
            "runner_growth": runner_peak - runner_idle if runners else None,
            "cli_peak": usage.ru_maxrss * 1024, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="300,30", help="file sizes in MB, the case under test first")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]

    with local_server_home("mem") as (home, env):
        proj = make_project(home / "project", WORKFLOWS)
        data = proj / "data.bin"
        data.write_bytes(b"warm-up")
        cmd = [DSTACK, "run", "hello"]
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)  # server and runner start
        server = json.loads((home / "server" / "server.json").read_text())["pid"]
        time.sleep(SETTLE_S)
        idle = vm(server, "VmRSS")
        print(f"DSTACK_HOME={home}; server pid {server}, idle RSS {idle / MB:.0f} MB", flush=True)
        runs: dict[int, list[dict]] = {s: [] for s in sizes}
        for i in range(a.rounds):
            for size in sizes:
                write_random(data, size * MB)  # new bytes: a new blob to upload
                time.sleep(SETTLE_S)
                r = measured_run(cmd, proj, env, server)
                r["server_growth"] = r["server_peak"] - idle
                runs[size].append(r)
                print(f"round {i + 1} {size:4d} MB: server RSS before {r['server_before'] / MB:.0f} MB, "
                      f"peak idle +{r['server_growth'] / MB:.0f} MB; runner +{(r['runner_growth'] or 0) / MB:.0f} MB; "
                      f"CLI peak {(r['cli_peak'] or 0) / MB:.0f} MB; {r['seconds']:.1f} s", flush=True)
                for blob in (home / "server" / "code").iterdir():  # keep the disk tidy: each run has its own
                    blob.unlink()

    def med(size: int, key: str) -> float:
        xs = [r[key] for r in runs[size] if r[key] is not None]
        return statistics.median(xs) / MB if xs else float("nan")

    big = sizes[0]
    rows = [{"file": f"{s} MB", "server peak - idle": f"{med(s, 'server_growth'):.0f} MB",
             "server RSS before runs": f"{med(s, 'server_before'):.0f} MB",
             "runner peak - idle": f"{med(s, 'runner_growth'):.0f} MB", "CLI peak": f"{med(s, 'cli_peak'):.0f} MB",
             "run": f"{statistics.median(r['seconds'] for r in runs[s]):.1f} s",
             "target": f"< {TARGET_MB} MB" if s == big else "(baseline)",
             "result": verdict(med(s, "server_growth"), TARGET_MB) if s == big else "-"} for s in sizes]
    print(f"\n{a.rounds} interleaved rounds, medians; server idle figure {idle / MB:.0f} MB:")
    print_table(rows, list(rows[0]))
    write_results("server_memory", {
        "rounds": a.rounds, "sizes_mb": sizes, "server_idle_mb": idle / MB,
        "cases": {f"{s}MB": {k: stats([r[k] / MB for r in runs[s]]) for k in ("server_before", "server_growth")}
                  | {"runs": runs[s]} for s in sizes},
        "checks": {"server_growth_mb": {"value": med(big, "server_growth"), "target_lt": TARGET_MB,
                                        "pass": med(big, "server_growth") < TARGET_MB}},
    })


if __name__ == "__main__":
    main()
