"""Cold start: from `dstack run` to the job's first output when no runner is up, so that the server's autoscaler
starts one for the job, through the `local` backend (a runner process on this machine) and through the `docker`
backend (a runner container on the local Docker Engine).

Cases, in rounds whose order turns (A B C D, B C D A, ...), 1 s of pause before each:
  docker-run     `docker run --rm --network host --entrypoint echo <runner image> <marker>`: the baseline, the
                 same image as the docker backend's runners, printing one line
  local-cold     `dstack run cold` (host workflow `commands: [echo <marker>]`, a git project), on a warm server
                 whose local backend has no runner up
  docker-cold    the same on a second warm server whose only backend is `docker` (default size: the whole machine;
                 no local runner: DSTACK_MAX_LOCAL_RUNNERS=0) with no runner container up
  busybox-run    `docker run --rm --network host dstack-test/busybox echo <marker>` (information: a 2 MB image)
  python-run     `docker run --rm --network host --entrypoint python3 <runner image> -c 'print(...)'`
                 (information: what starting Python in that image costs)
Each figure is from the start of the command to its first line of the job's output (the marker) on its stdout
(a pipe; the CLI writes the job's output as it comes). Between rounds each backend's runner exits idle (both
backends' `--idle-timeout 1`) and the script waits until its server counts no instance and no live runner.

The runner image is built (or found) before the first round and its build is not measured: the figure is the
container's start, the runner's start and registration in it, and the server's part. The script removes the image
tags it built at its end (--keep-image keeps them).

The code measured is a copy of src/dstack taken as the script starts (the script runs itself again with it first
on PYTHONPATH, and so do the servers, the CLI and the runners): the runner image's tag follows a hash of dstack's
files (backends/wheelhouse.py), and other sessions editing the working tree meanwhile would make a server rebuild
it in the middle of a measured run. A container created (never started) from the image holds it, so that another
session's runner image build does not prune it; a tag removed all the same is put back before the next round.
Targets: docker-cold < 3x docker-run, local-cold < 2x docker-run (medians of the per-round ratios).

    .venv/bin/python bench/cold_start.py [--rounds 10] [--keep-image]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cold import SNAPSHOT_ENV, run_on_a_snapshot, snapshot_hash, ts  # noqa: E402
from _common import DSTACK, env_for, fresh_home, make_project, ms, print_table, stats, verdict, write_results  # noqa: E402

MARKER = "cold-start-marker"
WORKFLOWS = f"workflows:\n  - name: cold\n    commands: [echo {MARKER}]\n"
BUSYBOX = "dstack-test/busybox:latest"
IDLE = 1  # seconds a runner waits for a job before it exits
DOCKER_TARGET, LOCAL_TARGET = 3.0, 2.0


def first_output(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float]:
    """Seconds from the start of `cmd` to the first line that holds the marker, and the wall clock then."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    seen = []
    for line in p.stdout:
        if MARKER.encode() in line:
            dt, wall = time.perf_counter() - t0, time.time()
            break
        seen.append(line)
    else:
        p.wait()
        raise RuntimeError(f"{cmd} exited {p.returncode} without the marker:\n{b''.join(seen)[-2000:].decode()}"
                           f"\n{p.stderr.read()[-2000:].decode(errors='replace')}")
    p.stdout.read()
    err = p.stderr.read()
    if p.wait(timeout=120) != 0:
        raise RuntimeError(f"{cmd} exited {p.returncode}: {err[-2000:].decode(errors='replace')}")
    return dt, wall


class Server:
    """A warm server in a fresh DSTACK_HOME (started by the CLI, as a user's is), reached over HTTP too."""

    def __init__(self, name: str, env: dict | None = None) -> None:
        import httpx

        self.home = fresh_home(f"cold-{name}")
        self.env = {**env_for(self.home), **(env or {})}
        self.project = make_project(self.home.parent / f"{self.home.name}-project", WORKFLOWS)
        self.cli("status")  # starts the server
        info = json.loads((self.home / "server" / "server.json").read_text())
        token = (self.home / "server" / "token").read_text().strip()
        self.http = httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def cli(self, *args: str) -> str:
        p = subprocess.run([DSTACK, *args], cwd=self.project, env=self.env, capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"dstack {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def run(self) -> tuple[float, float]:
        return first_output([DSTACK, "run", "cold"], cwd=self.project, env=self.env)

    def wait_no_runner(self, timeout: float = 60) -> float:
        """Until the server counts no instance alive and no live runner: seconds waited."""
        t0 = time.monotonic()
        while True:
            instances = self.http.get("/api/instances").json()
            runners = [r for r in self.http.get("/api/runners").json() if r["status"] in ("READY", "BUSY")]
            if not instances and not runners:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"runners still up after {timeout} s: {instances} {runners}")
            time.sleep(0.2)

    def last_breakdown(self, t_cli: float) -> dict:
        """Where the cold run's time went, from the server's own timestamps (same machine, same clock)."""
        run = self.http.get("/api/runs", params={"repo_id": self.repo_id(), "limit": 1}).json()[0]
        job = run["jobs"][0]
        inst = next(i for i in self.http.get("/api/instances", params={"all": True}).json()
                    if i["runner_name"] == job["runner"])
        return {"submitted": ts(job["submitted_at"]), "instance_created": ts(inst["created_at"]),
                "job_taken": ts(job["started_at"]), "cli_started": t_cli}

    def repo_id(self) -> str:
        if not hasattr(self, "_repo_id"):
            self._repo_id = json.loads(self.cli("status", "--all", "--json"))[0]["repo_id"]
        return self._repo_id

    def stop(self) -> None:
        subprocess.run([DSTACK, "server", "stop"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.project, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--keep-image", action="store_true", help="keep the runner image tags built here")
    args = ap.parse_args()
    run_on_a_snapshot(__file__)
    import docker

    import dstack
    from dstack.backends import runner_image, wheelhouse

    assert Path(dstack.__file__).resolve().is_relative_to(Path(os.environ[SNAPSHOT_ENV]).resolve()), dstack.__file__
    client = docker.from_env()
    tags_before = {t for image in client.images.list() for t in image.tags}
    load_before = os.getloadavg()
    local = docker_server = hold = None
    docker_id = None
    retagged = 0
    try:
        local = Server("local")
        local.cli("limits", "set", "local", "--idle-timeout", str(IDLE))
        docker_server = Server("docker", {"DSTACK_MAX_LOCAL_RUNNERS": "0"})
        from dstack.server.services.secrets import server_id

        docker_id = server_id(docker_server.home / "server")
        t0 = time.monotonic()
        image = runner_image.ensure(client, wheelhouse.ensure(docker_server.home / "server" / "wheels"))
        build_s = time.monotonic() - t0
        print(f"runner image {image}: {build_s:.1f} s to build or find (not measured)")
        image_id = client.images.get(image).id
        hold = client.containers.create(image_id, ["true"], name=f"dstack-bench-hold-{secrets.token_hex(4)}",
                                        network_mode="host")

        def keep_tag() -> None:
            nonlocal retagged
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                repo, tag = image.rsplit(":", 1)
                client.images.get(image_id).tag(repo, tag)
                retagged += 1
                print(f"(the tag {image} was removed by someone else: put back)", flush=True)

        docker_server.cli("backends", "add", "docker")
        docker_server.cli("limits", "set", "docker", "--idle-timeout", str(IDLE))
        baseline = ["docker", "run", "--rm", "--network", "host", "--entrypoint", "echo", image, MARKER]
        busybox = ["docker", "run", "--rm", "--network", "host", BUSYBOX, "echo", MARKER]
        python = ["docker", "run", "--rm", "--network", "host", "--entrypoint", "python3", image, "-c",
                  f"print('{MARKER}')"]
        for server in (local, docker_server):  # warm: the server's first run, and the runner's files cached
            server.run()
            server.wait_no_runner()
        first_output(baseline)

        cases = {"docker-run": lambda: first_output(baseline), "local-cold": local.run,
                 "docker-cold": docker_server.run, "busybox-run": lambda: first_output(busybox),
                 "python-run": lambda: first_output(python)}
        servers = {"local-cold": local, "docker-cold": docker_server}
        names = list(cases)
        times: dict[str, list[float]] = {k: [] for k in names}
        parts: dict[str, list[dict]] = {k: [] for k in servers}
        waited: list[float] = []
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[: i % len(names)]:
                if name in servers:
                    waited.append(servers[name].wait_no_runner())
                keep_tag()
                time.sleep(1.0)
                t_cli = time.time()
                dt, wall = cases[name]()
                times[name].append(dt)
                if name in servers:
                    b = servers[name].last_breakdown(t_cli)
                    parts[name].append({"submit": b["submitted"] - t_cli,
                                        "decide_and_create": b["instance_created"] - b["submitted"],
                                        "runner_up_and_take": b["job_taken"] - b["instance_created"],
                                        "take_to_output": wall - b["job_taken"]})
            print(f"round {i + 1}: " + ", ".join(f"{k} {ms(v[-1])}" for k, v in times.items()), flush=True)
    finally:
        for server in (local, docker_server):
            if server is not None:
                server.stop()
        if hold is not None:
            hold.remove(force=True)
        if docker_id is not None:
            for c in client.containers.list(all=True, filters={"label": f"dstack.server={docker_id}"}):
                c.remove(force=True, v=True)
        if not args.keep_image:
            made = {t for image in client.images.list() for t in image.tags} - tags_before
            for tag in sorted(made, key=lambda t: not t.startswith(runner_image.RUNNER_REPO)):
                if tag.startswith((runner_image.RUNNER_REPO, runner_image.BASE_REPO)):
                    client.images.remove(tag, force=True)

    base = statistics.median(times["docker-run"])
    ratios = {k: [x / y for x, y in zip(times[k], times["docker-run"], strict=True)] for k in names}
    targets = {"docker-cold": DOCKER_TARGET, "local-cold": LOCAL_TARGET}
    rows = []
    for k in names:
        s = stats(times[k])
        r = statistics.median(ratios[k])
        rows.append({"case": k, "median": ms(s["median"]), "p25-p75": f"{ms(s['p25'])}-{ms(s['p75'])}",
                     "vs docker-run": f"{r:.2f}x" if k != "docker-run" else "",
                     "target": f"< {targets[k]:g}x" if k in targets else "",
                     "result": verdict(r, targets[k]) if k in targets else ""})
    print()
    print_table(rows, ["case", "median", "p25-p75", "vs docker-run", "target", "result"])
    print("\nwhere a cold run's time goes (medians, s): CLI start to submitted; submitted to the backend's create()"
          " returned; to the job taken by the new runner; to its first output at the CLI")
    breakdown = {}
    for k, xs in parts.items():
        breakdown[k] = {p: statistics.median(x[p] for x in xs) for p in xs[0]}
        print(f"  {k}: " + ", ".join(f"{p} {v:.3f}" for p, v in breakdown[k].items()))
    write_results("cold_start", {
        "rounds": args.rounds, "image": image, "image_build_or_find_s": build_s, "loadavg_before": load_before,
        "image_tag_put_back": retagged, "snapshot_sha256": snapshot_hash(Path(os.environ[SNAPSHOT_ENV])),
        "cases": {k: stats(v) for k, v in times.items()}, "round_ratios": ratios, "breakdown_median_s": breakdown,
        "breakdown_samples": parts, "waited_for_no_runner_s": waited,
        "targets": {k: {"ratio": statistics.median(ratios[k]), "target_lt": t, "pass": statistics.median(ratios[k]) < t,
                        "ratio_of_medians": statistics.median(times[k]) / base} for k, t in targets.items()}})


if __name__ == "__main__":
    main()
