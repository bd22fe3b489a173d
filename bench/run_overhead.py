"""`dstack run` end to end on a warm local server and runner, against running the same thing directly.

Cases, interleaved round by round (A B C D E, A B C D E, ...), with a 1 s pause before each command:
  dstack-host         `dstack run hello`   (host workflow: `commands: [echo hi]`)
  sh                  `sh -c 'echo hi'`
  dstack-docker       `dstack run dhello`  (image dstack-test/busybox, `commands: [echo hi]`): the runner's
                      steady state, where the job starts in the container it warmed after the previous one
  docker-run          `docker run --rm --network host dstack-test/busybox sh -c 'echo hi'`
  dstack-docker-cold  the same workflow on a second server whose runner warms no container
                      (DSTACK_WARM_CONTAINERS=0): a container created for the job, as for the first job of
                      an image, or one with dependencies (for information; no target)

Targets: host workflow median < 0.5 s end to end; Docker workflow median < 1.3x `docker run --rm`.
The project is a git repo with one commit (code capture runs its git commands, as for a researcher).
Usage: python bench/run_overhead.py [--rounds 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DSTACK,
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

IMAGE = "dstack-test/busybox"
WORKFLOWS = f"""workflows:
  - name: hello
    commands:
      - echo hi
  - name: dhello
    image: {IMAGE}
    commands:
      - echo hi
"""
HOST_TARGET_S = 0.5
SETTLE_S = 1.0  # pause before each measured command: background work of the previous one ends
DOCKER_TARGET_RATIO = 1.3


def job_seconds(stderr: bytes) -> float | None:
    """The job's own duration as `dstack run` reports it at the end ("... DONE in 0.2s")."""
    m = re.search(rb"DONE in ([0-9.]+)s", stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()

    with local_server_home("run") as (home, env), local_server_home("run-cold") as (cold_home, cold_env):
        proj = make_project(home / "project", WORKFLOWS)
        kw = {"cwd": proj, "env": env}
        cold_kw = {"cwd": make_project(cold_home / "project", WORKFLOWS),
                   "env": {**cold_env, "DSTACK_WARM_CONTAINERS": "0"}}  # its server and runner inherit it
        docker_cmd = ["docker", "run", "--rm", "--network", "host", IMAGE, "sh", "-c", "echo hi"]
        cases = {
            "dstack-host": ([DSTACK, "run", "hello"], {**kw, "expect": b"hi"}),
            "sh": (["sh", "-c", "echo hi"], {"expect": b"hi"}),
            "dstack-docker": ([DSTACK, "run", "dhello"], {**kw, "expect": b"hi"}),
            "docker-run": (docker_cmd, {"expect": b"hi"}),
            "dstack-docker-cold": ([DSTACK, "run", "dhello"], {**cold_kw, "expect": b"hi"}),
        }
        print(f"DSTACK_HOME={home}; warming up (server start, runner start, {a.warmup} runs of each)...",
              flush=True)
        cold = {}
        for name, (cmd, ckw) in cases.items():
            for i in range(a.warmup):
                dt, _ = run_timed(cmd, **ckw)
                if i == 0:
                    cold[name] = dt
        times = interleaved(cases, a.rounds, settle=SETTLE_S)
        # the job's own reported duration, from a few extra runs (not timed above: stderr kept here)
        job_host = [job_seconds(run_timed(cases["dstack-host"][0], **kw)[1].stderr) for _ in range(3)]
        job_docker = [job_seconds(run_timed(cases["dstack-docker"][0], **kw)[1].stderr) for _ in range(3)]

    st = {k: stats(v) for k, v in times.items()}
    host, sh, dck, drun = (st[k]["median"] for k in ("dstack-host", "sh", "dstack-docker", "docker-run"))
    # per-round ratios (each pair measured back to back), then their median: robust to drifting noise
    docker_ratios = [x / y for x, y in zip(times["dstack-docker"], times["docker-run"], strict=True)]
    docker_ratio = statistics.median(docker_ratios)
    cold_ratio = statistics.median(x / y for x, y in zip(times["dstack-docker-cold"], times["docker-run"],
                                                         strict=True))
    rows = [
        {"measure": "host workflow (dstack run hello)", "value": ms(host), "baseline": f"sh -c: {ms(sh)}",
         "ratio": f"{host / sh:.0f}x", "target": f"< {HOST_TARGET_S} s", "result": verdict(host, HOST_TARGET_S)},
        {"measure": "docker workflow (dstack run dhello)", "value": ms(dck),
         "baseline": f"docker run --rm: {ms(drun)}", "ratio": f"{docker_ratio:.2f}x",
         "target": f"< {DOCKER_TARGET_RATIO}x", "result": verdict(docker_ratio, DOCKER_TARGET_RATIO)},
        {"measure": "docker workflow, no warm container", "value": ms(st["dstack-docker-cold"]["median"]),
         "baseline": f"docker run --rm: {ms(drun)}", "ratio": f"{cold_ratio:.2f}x", "target": "-",
         "result": "info"},
    ]
    print(f"\n{a.rounds} interleaved rounds, medians (p25-p75):")
    for k, s in st.items():
        print(f"  {k:18s} {ms(s['median']):>8s}  ({ms(s['p25'])} - {ms(s['p75'])})")
    print(f"  job duration as reported by `dstack run`: host {job_host} s, docker {job_docker} s")
    print(f"  first (cold) run: {', '.join(f'{k} {ms(v)}' for k, v in cold.items())}\n")
    print_table(rows, ["measure", "value", "baseline", "ratio", "target", "result"])
    write_results("run_overhead", {
        "rounds": a.rounds, "warmup": a.warmup, "cases": st, "cold_first_run_s": cold,
        "job_reported_s": {"host": job_host, "docker": job_docker},
        "docker_round_ratios": [round(x, 3) for x in docker_ratios],
        "docker_cold_ratio": cold_ratio,
        "checks": {
            "host_workflow_median_s": {"value": host, "target_lt": HOST_TARGET_S,
                                       "pass": host < HOST_TARGET_S, "baseline_sh_median_s": sh},
            "docker_workflow_ratio": {"value": docker_ratio, "target_lt": DOCKER_TARGET_RATIO,
                                      "pass": docker_ratio < DOCKER_TARGET_RATIO,
                                      "dstack_median_s": dck, "docker_run_median_s": drun,
                                      "ratio_of_medians": dck / drun},
        },
    })


if __name__ == "__main__":
    main()
