"""A real `dstack server` in the foreground for a test (no local runners), and what a test does with it as the
admin and as a runner: issue a runner's token, register, submit a run, take its job, report it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
RESOURCES = {"cpus": 1, "memory_mib": 512, "docker": False}


class Server:
    def __init__(self, home: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None):
        self.home = home
        env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0",
               "DSTACK_RUNNER_TIMEOUT": "600", **(env or {})}
        self.log = open(home.parent / f"{home.name}-server.log", "wb") if home.parent.is_dir() else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(BIN / "dstack"), "server", "--host", host, "--port", "0"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        info = home / "server" / "server.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"the server did not start: {self.log_text()}")
            time.sleep(0.1)
        self.url = json.loads(info.read_text())["url"]
        self.token = (home / "server" / "token").read_text().strip()
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def log_text(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-4000:]
        except (AttributeError, OSError):
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def check(self, r: httpx.Response) -> dict:
        assert r.status_code < 400, (r.status_code, r.text)
        return r.json() if r.content else {}

    def runner(self, name: str) -> httpx.Client:
        """A runner of that name, registered with a token of its own: its client."""
        token = self.check(self.admin.post("/api/runners/tokens", json={"name": name}))["token"]
        http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.check(http.post("/api/runners/register", json={"hostname": name, "resources": RESOURCES}))
        return http

    def submit(self, workflows: str, workflow: str, repo: str = "transfers") -> str:
        run = self.check(self.admin.post("/api/runs", json={
            "repo_id": repo, "workflow": workflow, "files": {".dstack/workflows.yaml": workflows}}))
        return run["run_name"]

    def take(self, runner: httpx.Client, name: str) -> dict:
        r = runner.post(f"/api/runners/{name}/take", params={"wait": 10})
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def finish(self, runner: httpx.Client, name: str, job_id: str, artifacts: list[dict] | None = None) -> None:
        self.check(runner.post(f"/api/runners/{name}/jobs/{job_id}/status",
                               json={"status": "DONE", "exit_code": 0, "artifacts": artifacts or []}))
