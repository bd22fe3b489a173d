"""A runner on a spot machine (`dstack-runner start --interruptible`): it runs only jobs that say they may be
interrupted, reads the provider's interruption notice (EC2's instance metadata service, IMDSv2: here one of the
test's own, on loopback) while they run, and on a notice the server requeues its job (`retry`) on another
runner and drains it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.e2e.conftest import BIN, Dstack, eventually

WORKFLOWS = """\
workflows:
  - name: plain
    commands: [echo plain]
  - name: spot
    resources:
      interruptible: true
    retry:
      limit: 1
    commands:
      - "if [ -f {shared}/first ]; then echo second attempt; else touch {shared}/first; echo first attempt; sleep 120; fi"
"""


class Imds(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.notice: dict | None = None
        self.tokens = 0
        super().__init__(("127.0.0.1", 0), _ImdsHandler)


class _ImdsHandler(BaseHTTPRequestHandler):
    server: Imds

    def log_message(self, *_):
        pass

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.server.tokens += 1
            self._answer(200, b"imds-token")
        else:
            self._answer(400, b"")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != "imds-token":
            self._answer(401, b"")
        elif self.path == "/latest/meta-data/spot/instance-action" and self.server.notice is not None:
            self._answer(200, json.dumps(self.server.notice).encode())
        else:
            self._answer(404, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _start_server(tmp_path):
    home = tmp_path / "server-home"
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    server = subprocess.Popen([str(BIN / "dstack"), "server", "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    info = home / "server" / "server.json"
    deadline = time.monotonic() + 30
    while not info.exists():
        assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
        time.sleep(0.1)
    return server, json.loads(info.read_text())["url"], (home / "server" / "token").read_text().strip()




def test_a_spot_runners_job_is_requeued_on_its_notice_and_ends_on_another_runner(tmp_path, project, shared):
    imds = Imds()
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    server, url, admin = _start_server(tmp_path)
    runners: list[subprocess.Popen] = []
    client = Dstack(tmp_path / "client-home")
    client.env.update({"DSTACK_SERVER_URL": url, "DSTACK_TOKEN": admin})
    root = project(WORKFLOWS.format(shared=shared))

    def runner(name: str, *extra: str) -> None:
        token = json.loads(client("runners", "add", "--name", name, "--json", cwd=root, check=True).stdout)["token"]
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(token)
        env = {**os.environ, "DSTACK_IMDS_URL": f"http://127.0.0.1:{imds.server_port}"}
        runners.append(subprocess.Popen([str(BIN / "dstack-runner"), "start", "--server", url, "--token-file",
                                         str(token_file), "--no-docker", "--workdir", str(tmp_path / name), *extra],
                                        env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(tmp_path / f"{name}.log", "wb")))
        eventually(lambda: any(r["name"] == name for r in json.loads(
            client("runners", "--json", cwd=root, check=True).stdout)), 60, f"runner {name} registers")

    try:
        runner("spot-a", "--interruptible")
        listed = json.loads(client("runners", "--json", cwd=root, check=True).stdout)
        assert listed[0]["resources"]["interruptible"] is True
        # a job that does not say it may be interrupted never goes to a spot machine
        plain = client("run", "plain", cwd=root)
        assert plain.returncode == 2 and "a machine that is not interruptible (spot)" in plain.stderr, plain
        r = client("run", "spot", "-d", cwd=root, check=True)
        name = json.loads(client("status", "--json", cwd=root, check=True).stdout)[0]["run_name"]
        eventually(lambda: (shared / "first").exists(), 60, "the first attempt starts on the spot runner")
        imds.notice = {"action": "terminate", "time": "2026-12-04T23:59:00Z"}
        deadline = time.monotonic() + 60
        while (info := client.run_info(root, name))["jobs"][0]["status"].lower() != "submitted":
            assert time.monotonic() < deadline, f"the job does not go back to the queue: {info['jobs'][0]}"
            time.sleep(0.3)
        assert "interrupted: runner spot-a's spot machine is being taken back (terminate at 2026-12-04T23:59:00Z)" \
            in info["jobs"][0]["reason"], info
        spot_a = next(x for x in json.loads(client("runners", "--json", cwd=root, check=True).stdout)
                      if x["name"] == "spot-a")
        assert spot_a["draining"] is True  # it takes no new job
        runner("on-demand-b")
        done = client.wait_status(root, name, {"DONE", "FAILED"}, timeout=90)
        assert done["status"] == "DONE" and done["jobs"][0]["runner"] == "on-demand-b", done
        logs = client("logs", name, cwd=root, check=True).stdout
        assert "first attempt" in logs and "second attempt" in logs, logs
        assert "the job starts again (attempt 2 of 2)" in logs, logs
        assert imds.tokens >= 1  # read through IMDSv2's session token
        del r
    finally:
        for p in runners:
            p.terminate()
        for p in runners:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        server.terminate()
        server.wait(timeout=30)
        imds.shutdown()
