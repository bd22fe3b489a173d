"""Submit-to-start with an idle runner (issue 14): from the POST that submits a run to the moment its job's
command starts on the runner, read from the job's own output (`date +%s.%N`, the same machine's clock).

Baseline, in the same rounds (A B A B): the same command started by a plain `subprocess.Popen` of bash, from
the Popen call to the time it prints. The run is submitted over HTTP as the CLI submits it (no CLI process
start in the figure), its job has no code (nothing to fetch) and the local runner is warm and idle.

    .venv/bin/python bench/submit_to_start.py [--rounds 60]
Target: p50 < 100 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DSTACK, local_server_home, make_project, print_table, verdict, write_results  # noqa: E402

WORKFLOWS = "workflows:\n  - name: stamp\n    commands: ['date +%s.%N']\n"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    import httpx

    with local_server_home("submit") as (home, env):
        project = make_project(home.parent / f"{home.name}-project", WORKFLOWS, git=False)
        for _ in range(3):  # the server, the runner and their first requests, warm
            subprocess.run([DSTACK, "run", "stamp"], cwd=project, env=env, check=True, capture_output=True)
        info = json.loads((home / "server" / "server.json").read_text())
        token = (home / "server" / "token").read_text().strip()
        http = httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)
        files = {".dstack/workflows.yaml": WORKFLOWS}
        request = {"repo_id": str(project), "workflow": "stamp", "args": [], "files": files, "project": str(project)}
        dstack, plain = [], []
        for _ in range(args.rounds):
            time.sleep(0.3)  # the runner idle again, its last report sent
            t0 = time.time()
            run = http.post("/api/runs", json=request).json()
            job_id = run["jobs"][0]["job_id"]
            while True:
                r = http.get(f"/api/jobs/{job_id}/logs", params={"wait": 10})
                if r.headers.get("x-job-status") in ("DONE", "FAILED") and "x-more-logs" not in r.headers:
                    break
            dstack.append(float(r.content.split()[0]) - t0)
            time.sleep(0.3)
            t0 = time.time()
            out = subprocess.run(["bash", "-c", "date +%s.%N"], capture_output=True, text=True).stdout
            plain.append(float(out.split()[0]) - t0)
    rows = []
    for name, xs in (("dstack: submit -> command starts", dstack), ("bash via subprocess.Popen", plain)):
        rows.append({"case": name, "p50": f"{statistics.median(xs) * 1000:.1f} ms",
                     "p99": f"{percentile(xs, 0.99) * 1000:.1f} ms", "max": f"{max(xs) * 1000:.1f} ms"})
    p50 = statistics.median(dstack)
    rows[0]["target"], rows[0]["verdict"] = "p50 < 100 ms", verdict(p50, 0.1)
    rows[0]["vs baseline"] = f"{p50 / statistics.median(plain):.1f}x"
    print_table(rows, ["case", "p50", "p99", "max", "vs baseline", "target", "verdict"])
    write_results("submit_to_start", {"rounds": args.rounds, "dstack_s": dstack, "plain_s": plain,
                                      "p50_s": p50, "p99_s": percentile(dstack, 0.99)})


if __name__ == "__main__":
    main()
