"""Where the time of the Docker executor goes: one trivial job (`echo hi` in dstack-test/busybox)
started and waited for through dstack's DockerExecutor in this process (one kept for all jobs, as
the runner keeps one), every Docker Engine API
request it makes timed; next to `docker run --rm` of the same, interleaved. No server, no runner:
the executor alone. Evidence for the Docker workflow overhead, not a benchmark with a target.
Usage: python bench/trace_docker.py [--runs 7]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ms, timed, write_results  # noqa: E402

IMAGE = "dstack-test/busybox"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()

    import requests

    from dstack.core.models import JobSpec
    from dstack.runner.executors.docker import DockerExecutor

    calls: list[tuple[str, float, float]] = []
    orig_send = requests.Session.send

    def send(self, request, **kw):
        t = time.perf_counter()
        try:
            return orig_send(self, request, **kw)
        finally:
            path = re.sub(r"^/v[0-9.]+", "", request.path_url.split("?")[0])  # /v1.41/containers/<id>/start
            path = re.sub(r"^/containers/(?!create|json)[^/]+", "/containers/ID", path)
            norm = path.lstrip("/")
            calls.append((f"{request.method} {norm}", t, time.perf_counter() - t))

    requests.Session.send = send
    docker_run = ["docker", "run", "--rm", "--network", "host", IMAGE, "sh", "-c", "echo hi"]
    phases: dict[str, list[float]] = {}
    by_call: dict[str, list[float]] = {}
    walls, cli = [], []
    executor = DockerExecutor()
    for i in range(a.runs + 1):
        out = bytearray()
        job = JobSpec(job_id=f"bench{i:07d}", run_name="bench-run-1", workflow="dhello", provider="docker",
                      image=IMAGE, commands=["echo hi"])
        with tempfile.TemporaryDirectory(prefix="dstack-bench-docker-") as root:
            calls.clear()
            t0 = time.perf_counter()
            execution = executor.start(job, Path(root), [], {}, out.extend)
            t1 = time.perf_counter()
            code = execution.wait()
            t2 = time.perf_counter()
            execution.dispose()  # the container goes in the background, as after the runner's final report
        assert code == 0 and b"hi" in out, (code, bytes(out))
        d = timed(docker_run, expect=b"hi")
        if i == 0:
            continue  # warm-up (client, image lookup caches)
        walls.append(t2 - t0)
        cli.append(d)
        phases.setdefault("start() (create, attach, start, resize)", []).append(t1 - t0)
        phases.setdefault("wait() (wait, drain output)", []).append(t2 - t1)
        seen: dict[str, int] = {}
        for name, _t, dt in calls:
            seen[name] = seen.get(name, 0) + 1
            by_call.setdefault(f"{name} #{seen[name]}", []).append(dt)
    med = {k: statistics.median(v) for k, v in by_call.items()}
    print(f"DockerExecutor, median of {a.runs} (after 1 warm-up):")
    print(f"  {ms(statistics.median(walls)):>8s}  start() + wait() in total")
    for k, v in phases.items():
        print(f"  {ms(statistics.median(v)):>8s}  {k}")
    print(f"  {ms(statistics.median(cli)):>8s}  `docker run --rm` of the same (interleaved)")
    print("Docker Engine API requests, in order (median each):")
    for k, v in med.items():
        print(f"  {v * 1000:8.1f} ms  {k}")
    print(f"  {sum(med.values()) * 1000:8.1f} ms  sum")
    write_results("trace_docker", {
        "runs": a.runs, "executor_total": statistics.median(walls), "docker_run": statistics.median(cli),
        "phases": {k: statistics.median(v) for k, v in phases.items()}, "api_calls_ms": {k: v * 1000 for k, v in med.items()},
    })


if __name__ == "__main__":
    main()
