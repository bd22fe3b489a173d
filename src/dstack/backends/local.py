"""`local`: runner processes on the server's own machine, started when a job waits for one and
gone after their idle timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import cached_property
from pathlib import Path

from dstack.backends.base import Bootstrap, Instance
from dstack.core.resources import RunnerResources


class LocalBackend:
    name = "local"

    def __init__(self, home: Path, max_runners: int = 4):
        self.home = Path(home)
        self.max_runners = max_runners
        self._procs: dict[str, tuple[subprocess.Popen, Instance]] = {}

    @cached_property
    def _resources(self) -> RunnerResources:
        from dstack.runner.resources import detect_resources

        return detect_resources()

    def offers(self) -> list[RunnerResources]:
        return [self._resources] if self.max_runners > 0 else []

    def create(self, offer: RunnerResources, bootstrap: Bootstrap) -> Instance:
        workdir = self.home / bootstrap.runner_name
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / "runner.log", "ab")
        env = {**os.environ, "DSTACK_TOKEN": bootstrap.token}
        cmd = [sys.executable, "-m", "dstack.runner.main", "start", "--server", bootstrap.server_url,
               "--name", bootstrap.runner_name, "--backend", self.name, "--workdir", str(workdir),
               "--idle-timeout", str(bootstrap.idle_timeout)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        log.close()
        inst = Instance(id=str(proc.pid), runner_name=bootstrap.runner_name, started_at=time.monotonic())
        self._procs[inst.id] = (proc, inst)
        return inst

    def terminate(self, instance_id: str) -> None:
        proc, _ = self._procs.pop(instance_id, (None, None))
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def list(self) -> list[Instance]:
        for iid, (proc, _) in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[iid]
        return [inst for _, inst in self._procs.values()]

    def release_jobs(self, job_ids: list[str]) -> None:
        """Jobs whose runner died: their containers (if any) must not run on."""
        if not job_ids or not self._resources.docker:
            return
        from dstack.runner.executors.docker import remove_orphans

        remove_orphans()

    def shutdown(self, grace: float = 10.0) -> None:
        procs = [p for p, _ in self._procs.values() if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
