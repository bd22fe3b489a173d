"""Fault drill: the embedded default (local server, local runners) loses nothing when its server is killed
mid-job, nor when its server's disk fills while jobs end.

    .venv/bin/python bench/fault_drill.py [--jobs 4] [--kills 2] [--lines 60]

Phase 1 (crash): JOBS host jobs run at once, each printing LINES numbered lines (0.1 s apart), recording its
start in a file outside dstack, and saving an artifact. The server is SIGKILLed KILLS times while they run
(each time, the next `dstack status` starts it again, as a user's next command would).
Phase 2 (full disk, root only: a tmpfs is mounted): the server's state (DSTACK_HOME/server: its database and
the logs) on a 48 MiB tmpfs, the runners and the artifact store on another disk; JOBS jobs wait for a file;
the tmpfs is filled to the last byte, the jobs are let go (their ends cannot be written), then the disk is
freed. Each phase prints what survived: jobs lost (not DONE), jobs run twice, output lines lost (or doubled),
artifacts lost. Every figure must be 0; the exit code is 1 otherwise."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DSTACK, env_for, fresh_home  # noqa: E402

WORKFLOWS = """\
workflows:
  - name: count
    commands:
      - echo "$JOB_ID" >> {starts}
      - {wait}
      - for i in $(seq 1 {lines}); do echo "$JOB_ID line $i"; sleep 0.1; done
      - mkdir -p out && echo "$JOB_ID" > out/who.txt
    artifacts:
      - out
"""


def dstack(env: dict, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DSTACK, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def runs(env: dict, cwd: Path) -> list[dict]:
    """The project's runs; [] (all lost) when the server does not answer within 10 tries."""
    for _ in range(10):
        r = dstack(env, cwd, "status", "--all", "--json")
        if r.returncode == 0:
            return json.loads(r.stdout)
        time.sleep(1)
    print(f"  `dstack status` fails: {r.stderr.strip()}", file=sys.stderr)
    return []


def kill_server(home: Path) -> bool:
    try:
        os.kill(json.loads((home / "server" / "server.json").read_text())["pid"], signal.SIGKILL)
        return True
    except (OSError, ValueError, KeyError):  # no server runs (it did not come back)
        return False


def submit(env: dict, cwd: Path, jobs: int) -> None:
    for _ in range(jobs):
        r = dstack(env, cwd, "run", "count", "-d")
        if r.returncode != 0:
            raise SystemExit(f"submission failed: {r.stderr}")


def wait_all_finished(env: dict, cwd: Path, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = runs(env, cwd)
        if all(r["status"] in ("DONE", "FAILED", "STOPPED", "ABORTED") for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def tally(env: dict, cwd: Path, found: list[dict], starts: Path, lines: int, jobs: int) -> dict:
    started = starts.read_text().split() if starts.exists() else []
    figures = {"jobs": jobs, "jobs lost": 0, "jobs run twice": 0, "output lines lost": 0,
               "output lines doubled": 0, "artifacts lost": 0}
    figures["jobs lost"] = jobs - sum(r["status"] == "DONE" for r in found)
    for r in found:
        job = r["jobs"][0]
        job_id = job["job_id"]
        figures["jobs run twice"] += started.count(job_id) > 1
        logs = dstack(env, cwd, "logs", r["run_name"]).stdout.replace("\r\n", "\n").splitlines()
        got = [ln for ln in logs if ln.startswith(f"{job_id} line ")]
        want = [f"{job_id} line {i}" for i in range(1, lines + 1)]
        figures["output lines lost"] += len(set(want) - set(got))
        figures["output lines doubled"] += len(got) - len(set(got))
        listed = dstack(env, cwd, "artifacts", "list", r["run_name"], "--json")
        arts = json.loads(listed.stdout) if listed.returncode == 0 else []
        figures["artifacts lost"] += not (arts and arts[0]["path"] == "out" and arts[0]["files"] == 1)
        if r["status"] != "DONE":
            print(f"  {r['run_name']}: {r['status']}: {job.get('reason')}", file=sys.stderr)
    return figures


def crash_phase(jobs: int, kills: int, lines: int) -> dict:
    home = fresh_home("drill-crash")
    env = env_for(home)
    project = Path(tempfile.mkdtemp(prefix="dstack-drill-project-"))
    starts = project.parent / f"{project.name}.starts"
    (project / ".dstack").mkdir()
    (project / ".dstack" / "workflows.yaml").write_text(
        WORKFLOWS.format(starts=starts, wait="true", lines=lines))
    try:
        submit(env, project, jobs)
        for k in range(kills):
            time.sleep(lines * 0.1 / (kills + 1))
            if not kill_server(home):
                print("  no server ran to be killed", file=sys.stderr)
            time.sleep(1.0)  # output and reports pile up on the runners meanwhile
            dstack(env, project, "status")  # the user's next command starts the server again
            print(f"  killed the server ({k + 1}/{kills}) and started it again", file=sys.stderr)
        found = wait_all_finished(env, project, timeout=lines * 0.1 * jobs + 120)
        return tally(env, project, found, starts, lines, jobs)
    finally:
        dstack(env, project, "server", "stop", "--force")
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(project, ignore_errors=True)
        starts.unlink(missing_ok=True)


def full_disk_phase(jobs: int, lines: int) -> dict | None:
    if os.geteuid() != 0:
        print("  (skipped: mounting a tmpfs needs root)", file=sys.stderr)
        return None
    home = fresh_home("drill-disk")
    disk = home / "server"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    env = env_for(home)
    project = Path(tempfile.mkdtemp(prefix="dstack-drill-project-"))
    starts, go = project.parent / f"{project.name}.starts", project.parent / f"{project.name}.go"
    (project / ".dstack").mkdir()
    (project / ".dstack" / "workflows.yaml").write_text(
        WORKFLOWS.format(starts=starts, wait=f"while [ ! -e {go} ]; do sleep 0.1; done", lines=lines))
    try:
        submit(env, project, jobs)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(starts.read_text().split() if starts.exists() else []) < jobs:
            time.sleep(0.2)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
        os.close(fd)
        go.touch()
        time.sleep(lines * 0.1 + 3)  # the jobs end; their output and ends cannot be written
        stuck = [r["jobs"][0].get("reason") for r in runs(env, project)]
        print(f"  disk full: {sum('no space left' in (x or '') for x in stuck)}/{jobs} jobs say so in "
              f"`dstack status`", file=sys.stderr)
        filler.unlink()
        found = wait_all_finished(env, project, timeout=120)
        return tally(env, project, found, starts, lines, jobs)
    finally:
        dstack(env, project, "server", "stop", "--force")
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(project, ignore_errors=True)
        starts.unlink(missing_ok=True)
        go.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--lines", type=int, default=60)
    a = p.parse_args()
    results = {}
    print("phase 1: the server is killed mid-job", file=sys.stderr)
    results["server killed"] = crash_phase(a.jobs, a.kills, a.lines)
    print("phase 2: the server's disk fills while jobs end", file=sys.stderr)
    disk = full_disk_phase(a.jobs, a.lines)
    if disk is not None:
        results["disk full"] = disk
    keys = list(next(iter(results.values())))
    print(f"{'':24}" + "".join(f"{k:>16}" for k in results))
    for k in keys:
        print(f"{k:24}" + "".join(f"{v[k]:>16}" for v in results.values()))
    bad = any(v[k] for v in results.values() for k in keys if k != "jobs")
    print("FAIL: something was lost" if bad else "PASS: nothing lost")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
