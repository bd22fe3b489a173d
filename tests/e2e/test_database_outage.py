"""A server on PostgreSQL whose database goes away for a while (stopped, restarted): the API answers 503 naming the
database meanwhile, never 500, so that a runner keeps the report of a job that ended then and sends it again until
it lands; after a restart of the database, one answer at most is such a 503. A cluster of the test's own (it is stopped here), a
real server and a real self-hosted runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.e2e.conftest import BIN
from tests.postgres import Cluster

WORKFLOWS = "workflows:\n  - name: w\n    commands: [echo start, sleep 2, echo end]\n"


def test_a_job_that_ends_while_the_database_is_down_is_recorded_once_it_is_back(tmp_path):
    cluster = Cluster.start()
    home = tmp_path / "home"
    procs = []
    try:
        env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0",
               "DSTACK_DATABASE_URL": cluster.database()}
        procs.append(subprocess.Popen([sys.executable, "-m", "dstack.server.main", "--home", str(home)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        info = home / "server" / "server.json"
        deadline = time.monotonic() + 30
        while not info.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "the server did not start"
            time.sleep(0.05)
        url = json.loads(info.read_text())["url"]
        api = httpx.Client(base_url=url, timeout=30,
                           headers={"Authorization": f"Bearer {(home / 'server' / 'token').read_text().strip()}"})
        token = api.post("/api/runners/tokens", json={"name": "r1"}).raise_for_status().json()["token"]
        (tmp_path / "token").write_text(token)
        procs.append(subprocess.Popen(
            [str(BIN / "dstack-runner"), "start", "--server", url, "--token-file", str(tmp_path / "token"),
             "--no-docker", "--workdir", str(tmp_path / "work")],
            env={**env, "DSTACK_HOME": str(tmp_path / "runner-home")}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        while not api.get("/api/runners").json():
            assert time.monotonic() < deadline, "the runner did not register"
            time.sleep(0.1)

        cluster.restart()  # the pool's connections are dead now: the first that is used says so, then all are new
        assert [api.get("/api/runs").status_code for _ in range(3)] in ([503, 200, 200], [200, 200, 200])

        run = api.post("/api/runs", json={"repo_id": "r", "workflow": "w",
                                          "files": {".dstack/workflows.yaml": WORKFLOWS}}).raise_for_status().json()
        job_id = run["jobs"][0]["job_id"]
        while api.get(f"/api/jobs/{job_id}").json()["status"] != "RUNNING":
            assert time.monotonic() < deadline + 30, "the job did not start"
            time.sleep(0.1)
        cluster.pause()
        r = api.get(f"/api/jobs/{job_id}")
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["kind"] == "unavailable" and error["message"].startswith(
            f"the server cannot reach its database at postgresql+asyncpg://postgres@127.0.0.1:{cluster.port}/")
        time.sleep(4)  # the job ends meanwhile; its runner cannot report it
        cluster.resume()
        deadline = time.monotonic() + 30
        while (job := api.get(f"/api/jobs/{job_id}").json())["status"] != "DONE":
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert api.get(f"/api/jobs/{job_id}/logs").content == b"start\nend\n"
        assert api.get("/api/runners").json()[0]["status"] == "READY"  # not taken for lost meanwhile
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        cluster.stop()
