"""Bad input to the HTTP API is a 4xx that says what is wrong, never a server error: every parameter is
bounded (ints that SQLite can hold, sizes >= 0, names by their rules), a job's log takes output only from its
runner while it runs, and a busy runner's name is not taken over. Then an API fuzzer (schemathesis, over the
app's own OpenAPI) finds no 5xx. A real server on loopback in a DSTACK_HOME of its own, once on SQLite and once on
PostgreSQL; runners are played over HTTP, as dstack-runner talks to the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import BIN

WORKFLOWS = "workflows:\n  - name: w\n    commands: [echo hi]\n"
RESOURCES = {"cpus": 2, "memory_mib": 1024}
MAX_INT64 = 2**63 - 1


class Api:
    def __init__(self, home: Path, url: str, token: str):
        self.home, self.url, self.token = home, url, token
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def register(self, name: str, **extra) -> httpx.Response:
        return self.http.post("/api/runners/register",
                              json={"hostname": "box", "resources": RESOURCES, "name": name, **extra})

    def run(self, **extra) -> dict:
        r = self.http.post("/api/runs", json={"repo_id": "bounds", "workflow": "w",
                                              "files": {".dstack/workflows.yaml": WORKFLOWS}, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    def job_on(self, runner: str) -> str:
        """A new run's job, taken by the (new) runner `runner`: PROVISIONING, the runner BUSY."""
        assert self.register(runner).status_code == 200
        self.run()
        r = self.http.post(f"/api/runners/{runner}/take", params={"wait": 5})
        assert r.status_code == 200, r.text
        return r.json()["job_id"]

    def report(self, runner: str, job_id: str, status: str, **extra) -> httpx.Response:
        return self.http.post(f"/api/runners/{runner}/jobs/{job_id}/status", json={"status": status, **extra})

    def logs(self, runner: str, job_id: str, data: bytes) -> httpx.Response:
        return self.http.post(f"/api/runners/{runner}/jobs/{job_id}/logs", content=data)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("bounds-home")
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0",
           "DSTACK_RUNNER_TIMEOUT": "600"}  # the runners played here send no heartbeats
    env.pop("DSTACK_DATABASE_URL", None)
    if request.param == "postgresql":
        env["DSTACK_DATABASE_URL"] = request.getfixturevalue("postgres").database()
    server = subprocess.Popen([sys.executable, "-m", "dstack.server.main", "--home", str(home)], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(home / "stderr.log", "wb"))
    info = home / "server" / "server.json"
    deadline = time.monotonic() + 30
    while not info.exists():
        assert time.monotonic() < deadline and server.poll() is None, (home / "stderr.log").read_text()
        time.sleep(0.05)
    api = Api(home, json.loads(info.read_text())["url"], (home / "server" / "token").read_text().strip())
    api.database = request.param
    yield api
    server.terminate()
    server.wait(timeout=30)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def test_ints_past_what_sqlite_holds_are_refused(api):
    assert "limit" in _error(api.http.get("/api/runs", params={"limit": MAX_INT64 + 1}), 422)["message"]
    assert api.http.get("/api/runs", params={"limit": MAX_INT64}).status_code == 200
    job = api.job_on("ints-runner")
    assert api.report("ints-runner", job, "DONE", exit_code=0).status_code == 200
    assert "offset" in _error(api.http.get(f"/api/jobs/{job}/logs", params={"offset": 2**63}), 422)["message"]
    r = api.http.get(f"/api/jobs/{job}/logs", params={"offset": MAX_INT64})
    assert r.status_code == 200 and r.content == b"", r.text


def test_a_status_report_out_of_range_is_refused(api):
    job = api.job_on("report-runner")
    for bad in ({"exit_code": 2**64}, {"ports": [70000]}, {"ports": [0]}, {"artifacts": [{"x": 1}]},
                {"artifacts": [{"path": "a", "manifest": "m", "files": -1, "size": 0}]}):
        _error(api.report("report-runner", job, "RUNNING", **bad), 422)
    assert api.http.get(f"/api/jobs/{job}").json()["status"] == "PROVISIONING"  # nothing of it was taken


def test_a_registration_with_negative_resources_is_refused(api):
    err = _error(api.register("negative", resources={"cpus": -5, "memory_mib": 1024}), 422)
    assert "resources.cpus" in err["message"] and "greater than or equal to 0" in err["message"], err
    _error(api.register("negative", resources={"cpus": 1, "memory_mib": -1}), 422)
    _error(api.register("negative", resources={"cpus": 1, "memory_mib": 1, "gpus": [{"name": "g", "memory_mib": -1}]}),
           422)
    assert all(r["name"] != "negative" for r in api.http.get("/api/runners", params={"all": True}).json())


@pytest.mark.parametrize("name", ["x\nrunner-2", "a/b", "..", "-x", "r" * 101])
def test_a_runner_name_that_breaks_the_rules_is_refused(api, name):
    err = _error(api.register(name), 400 if len(name) <= 100 else 422)
    assert err["kind"] == ("config" if len(name) <= 100 else "error"), err


def test_a_busy_live_runners_name_is_not_taken_over(api):
    job = api.job_on("busy-runner")
    err = _error(api.register("busy-runner"), 409)
    assert err["message"] == f"runner busy-runner is registered already and runs job {job}", err
    [runner] = [r for r in api.http.get("/api/runners").json() if r["name"] == "busy-runner"]
    assert runner["status"] == "BUSY" and runner["job_id"] == job
    assert api.report("busy-runner", job, "DONE", exit_code=0).status_code == 200
    assert api.register("busy-runner").status_code == 200  # idle now: it may come back under its name


def test_a_jobs_log_takes_output_only_from_its_runner_while_it_runs(api):
    job = api.job_on("log-runner")
    assert api.register("other-runner").status_code == 200
    assert api.logs("log-runner", job, b"mine\n").status_code == 200
    assert "not assigned to runner other-runner" in _error(api.logs("other-runner", job, b"forged\n"), 409)["message"]
    assert "no job 'feedfeedfeed'" in _error(api.logs("log-runner", "feedfeedfeed", b"x"), 404)["message"]
    assert not (api.home / "server" / "logs" / "feedfeedfeed.log").exists()
    assert api.report("log-runner", job, "DONE", exit_code=0, logs="bGFzdAo=").status_code == 200  # "last\n"
    err = _error(api.logs("log-runner", job, b"late\n"), 409)
    assert err["message"] == f"job {job} is DONE: its log takes no more output", err
    assert api.http.get(f"/api/jobs/{job}/logs").content == b"mine\nlast\n"
    # an offset far past the end (the fuzzer found it: seek() past what a file may hold) is nothing yet, not a 500
    far = api.http.get(f"/api/jobs/{job}/logs", params={"offset": 5057867768458170368})
    assert far.status_code == 200 and far.content == b"", far.text


def test_names_with_control_characters_are_refused_over_http(api):
    job = api.job_on("tag-runner")
    assert api.report("tag-runner", job, "DONE", exit_code=0).status_code == 200
    run_name = api.http.get(f"/api/jobs/{job}").json()["run_name"]
    err = _error(api.http.post("/api/tags", json={"repo_id": "bounds", "run_name": run_name, "tag": "v1\x1b[2J"}), 400)
    assert err["kind"] == "config" and err["message"] == "the tag name 'v1\\x1b[2J' holds a control character (\\x1b)"
    assert api.http.get("/api/tags", params={"repo_id": "bounds"}).json() == []
    r = api.http.post("/api/runs", json={"repo_id": "bounds", "workflow": "w\nx",
                                         "files": {".dstack/workflows.yaml": WORKFLOWS}})
    assert _error(r, 400)["message"] == "the workflow name 'w\\nx' holds a control character (\\n)"
    r = api.http.post("/api/runs", json={"repo_id": "bounds", "workflow": "w", "tag": "t\u202e",
                                         "files": {".dstack/workflows.yaml": WORKFLOWS}})
    assert _error(r, 400)["kind"] == "config"


def test_an_exit_code_past_32_bits_is_refused_and_a_nul_in_a_reason_is_kept_escaped(api):
    job = api.job_on("nul-runner")
    _error(api.report("nul-runner", job, "FAILED", exit_code=2**31), 422)
    assert api.report("nul-runner", job, "FAILED", exit_code=-(2**31), reason="a\x00b").status_code == 200
    assert api.http.get(f"/api/jobs/{job}").json()["reason"] == "a\\x00b"  # the runner's report is never refused


def test_a_nul_character_that_the_database_cannot_hold_is_a_400(api):
    """PostgreSQL's text holds no NUL; SQLite's does (there a repo or hostname with one is merely odd)."""
    responses = [api.http.get("/api/runs", params={"repo_id": "a\x00b"}),
                 api.http.post("/api/runs", json={"repo_id": "a\x00b", "workflow": "w",
                                                  "files": {".dstack/workflows.yaml": WORKFLOWS}}),
                 api.register("nul-host", hostname="h\x00")]
    if api.database == "sqlite":
        assert [r.status_code for r in responses] == [200, 200, 200]
    else:
        for r in responses:
            assert _error(r, 400)["message"] == "the request holds a NUL character (\\x00), which the database " \
                                                "does not store"


FUZZ_SECONDS = 25  # on each database


def test_the_api_fuzzer_finds_no_server_error(api, tmp_path):
    """schemathesis over the app's OpenAPI (made in-process: the server exposes none), with the admin token and
    some of what exists (runners, a finished and a running job, a run) and ints at the edges of 32 and 64 bits
    among the values it tries. One worker: threads of it may hit a race of CPython 3.11's ast.parse."""
    from dstack.server.app import create_app
    from dstack.server.context import Settings

    done = api.job_on("fuzz-done")
    assert api.report("fuzz-done", done, "DONE", exit_code=0, logs="aGkK").status_code == 200
    running = api.job_on("fuzz-running")
    assert api.report("fuzz-running", running, "RUNNING").status_code == 200
    run_name = api.http.get(f"/api/jobs/{done}").json()["run_name"]
    schema = create_app(Settings(home=tmp_path / "unused", db_url="sqlite://", token="-")).openapi()
    for operation in (op for path in schema["paths"].values() for op in path.values()):
        # the token is the harness's (the admin token, below): never a parameter to fuzz
        operation["parameters"] = [p for p in operation.get("parameters", []) if p["name"].lower() != "authorization"]
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    names = json.dumps(["fuzz-done", "fuzz-running", run_name])
    (tmp_path / "schemathesis.toml").write_text(f"""\
headers = {{ Authorization = "Bearer {api.token}" }}
request-timeout = 20
[dictionaries.names]
values = {names}
[dictionaries.jobs]
values = {json.dumps([done, running])}
[dictionaries.repos]
values = ["bounds"]
[dictionaries.ints]  # where ints break: at the edges of 32 and 64 bits
values = [-1, 0, 2147483648, {MAX_INT64}, {MAX_INT64 + 1}, {2**64}]
[parameters]
"path.name" = {{ dictionary = "names", probability = 0.5 }}
"path.ref" = {{ dictionary = "names", probability = 0.5 }}
"path.job_id" = {{ dictionary = "jobs", probability = 0.5 }}
"query.repo_id" = {{ dictionary = "repos", probability = 0.5 }}
"query.limit" = {{ dictionary = "ints", probability = 0.3 }}
"query.offset" = {{ dictionary = "ints", probability = 0.3 }}
"body.exit_code" = {{ dictionary = "ints", probability = 0.3 }}
"body.resources.cpus" = {{ dictionary = "ints", probability = 0.3 }}
"body.resources.memory_mib" = {{ dictionary = "ints", probability = 0.3 }}
# long polls answer at once: each case is one quick request
"query.wait" = 0
""")
    r = subprocess.run([str(BIN / "schemathesis"), "--config-file", str(tmp_path / "schemathesis.toml"), "run",
                        str(tmp_path / "openapi.json"), "--url", api.url, "--checks", "not_a_server_error",
                        "--max-examples", "100", "--max-time", str(FUZZ_SECONDS), "--workers", "1", "--no-color"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60)
    assert "ST101" not in r.stdout and r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]


def test_asking_to_download_nothing_is_an_empty_answer(tmp_path):
    """The fuzzer's find: a runner asking for the download of no blob (its job has no dependency) got a 500."""
    from tests.dstack_server import Server

    server = Server(tmp_path / "home")
    try:
        runner = server.runner("empty-ask")
        server.submit("workflows:\n  - name: a\n    commands: [echo]\n", "a")
        job = server.take(runner, "empty-ask")
        job_id = job.get("job_id") or job["job"]["job_id"]
        r = runner.post(f"/api/runners/empty-ask/jobs/{job_id}/downloads", json={"hashes": []})
        assert r.status_code == 200, r.text
        other = runner.post("/api/runners/empty-ask/jobs/000000000000/downloads", json={"hashes": []})
        assert other.status_code in (403, 404), other.text  # not its job: refused, even asking for nothing
    finally:
        server.stop()
