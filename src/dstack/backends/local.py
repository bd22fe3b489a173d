"""`local`: runner processes on the server's own machine, started when a job waits for one and
gone after their idle timeout.

Each runner's folder (`DSTACK_HOME/runners/<name>/`) holds `runner.json`, which says which process it is
(pid and start time). A server that starts after another one of its DSTACK_HOME died (killed, crashed) finds
the runners that outlived it there and counts them as its own: they go on with their jobs and report to it,
and no second runner is started beside them for the same work. The folders of runners that are gone are
removed (a killed runner's job folders with them), all but their log."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import cached_property
from pathlib import Path

from dstack.backends.base import Bootstrap, Instance, Offer
from dstack.core.processes import (
    is_running,
    read_record,
    record,
    runner_stop_wait,
    signal_recorded,
    terminate_all,
)
from dstack.core.resources import RunnerResources
from dstack.runner import job_user
from dstack.runner.workspace import remove

RECORD = "runner.json"
SPARE_DELAY = 2.0  # seconds after a runner's start before the next spare is made


def _env() -> dict[str, str]:
    """A runner's environment: the server's, without its token (nor the server's cloud credentials: a runner
    reaches an S3 store by presigned URLs alone)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("DSTACK_TOKEN", "DSTACK_SERVER_TOKEN") and not k.startswith("AWS_")}
log = logging.getLogger("dstack.server")


class LocalBackend:
    name = "local"
    startup_grace = 60.0  # a runner process that has not registered by then is given up
    list_interval = 0.0  # listing is looking at its processes: every pass
    adopts_unknown = True  # runners a server of this DSTACK_HOME started before (they outlived it) are its own

    def __init__(self, home: Path, max_runners: int = 1, spares: bool = False):
        self.home = Path(home)
        self.max_runners = max_runners
        self.spares = spares and os.environ.get("DSTACK_LOCAL_SPARE", "1") != "0"
        self._procs: dict[str, tuple[subprocess.Popen | None, Instance, int | None]] = {}  # id -> (child, ., start)
        self._spare: subprocess.Popen | None = None
        self._spare_lock = threading.Lock()
        self._leftovers_lock = threading.Lock()
        self._closed = False
        self._adopt()
        self._spare_later(1.0)  # once the server is up

    @cached_property
    def _resources(self) -> RunnerResources:
        from dstack.runner.resources import detect_resources

        return detect_resources()

    def offers(self) -> list[Offer]:
        """This machine, at no price."""
        return [Offer(self.name, self._resources)] if self.max_runners > 0 else []

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance:
        workdir = self.home / bootstrap.runner_name
        workdir.mkdir(parents=True, exist_ok=True)
        # its token in a file only it may read, which it removes once read: never in an environment, where a
        # job could read it (/proc/PID/environ)
        token_file = workdir / "runner.token"
        token_file.unlink(missing_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bootstrap.token)
        argv = ["--server", bootstrap.server_url, "--name", bootstrap.runner_name, "--backend", self.name,
                "--workdir", str(workdir), "--idle-timeout", str(bootstrap.idle_timeout), "--token-file",
                str(token_file)]
        proc = self._take_spare(argv, workdir / "runner.log")
        if proc is None:
            log = open(workdir / "runner.log", "ab")
            proc = subprocess.Popen([sys.executable, "-m", "dstack.runner.main", "start", *argv],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                    start_new_session=True)
            log.close()
        record(workdir / RECORD, proc.pid, name=bootstrap.runner_name)
        inst = Instance(id=str(proc.pid), runner_name=bootstrap.runner_name, started_at=time.monotonic())
        self._procs[inst.id] = (proc, inst, None)
        self._spare_later()  # for the next one
        # what runners gone before left: after this one is started, not on its way (removing a job's folder may
        # take a while)
        threading.Thread(target=self._remove_leftovers_quietly, name="local-leftovers", daemon=True).start()
        return inst

    def _remove_leftovers_quietly(self) -> None:
        try:
            self.remove_leftovers()
        except OSError as e:
            log.warning("could not remove what gone runners left: %s", e)

    # A spare: a runner process made ahead of need (`dstack-runner spare`: imports done, the machine looked at),
    # waiting on its stdin for the arguments of `start`. A job that waits with no runner up gets its runner in
    # milliseconds instead of the ~300 ms a new Python process costs. It is no runner (it has no token, takes no
    # job, is not listed); it ends with the server (the end of its stdin).
    def _take_spare(self, argv: list[str], log_path: Path) -> subprocess.Popen | None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None or spare.poll() is not None:
            return None
        try:
            spare.stdin.write((json.dumps({"argv": argv, "log": str(log_path)}) + "\n").encode())
            spare.stdin.close()
        except OSError:
            spare.kill()
            return None
        return spare

    def _spare_later(self, delay: float = SPARE_DELAY) -> None:
        """Make a spare after `delay` s (not while the runner just started competes for the CPU)."""
        if not self.spares or self.max_runners <= 0:
            return
        timer = threading.Timer(delay, self._make_spare)
        timer.daemon = True
        timer.start()

    def _make_spare(self) -> None:
        with self._spare_lock:
            if self._closed or (self._spare is not None and self._spare.poll() is None):
                return
            self._spare = subprocess.Popen([sys.executable, "-m", "dstack.runner.main", "spare"],
                                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)

    def _end_spare(self) -> None:
        with self._spare_lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            spare.stdin.close()  # it ends
            try:
                spare.wait(5)
            except subprocess.TimeoutExpired:
                spare.kill()

    def _adopt(self) -> None:
        """The runners that a previous server process of this DSTACK_HOME started and that still run."""
        for path in sorted(self.home.glob(f"*/{RECORD}")):
            rec = read_record(path)
            if rec is not None and str(rec["pid"]) not in self._procs:
                inst = Instance(id=str(rec["pid"]), runner_name=rec.get("name") or path.parent.name,
                                started_at=time.monotonic())
                self._procs[inst.id] = (None, inst, rec.get("started"))

    def _running(self, proc: subprocess.Popen | None, inst: Instance, started: int | None) -> bool:
        if proc is not None:
            return proc.poll() is None
        return is_running(int(inst.id), started)

    def terminate(self, instance_id: str) -> bool:
        proc, inst, started = self._procs.pop(instance_id, (None, None, None))
        if proc is not None and proc.poll() is None:
            proc.terminate()
        elif proc is None and inst is not None:
            signal_recorded(int(inst.id), started, signal.SIGTERM)
        return True  # SIGTERM: it finishes its job's report and exits

    def list(self) -> list[Instance]:
        for iid, entry in list(self._procs.items()):
            if not self._running(*entry):
                self._procs.pop(iid, None)  # (also called from the leftovers' thread)
        return [inst for _, inst, _ in list(self._procs.values())]

    def remove_leftovers(self) -> None:
        """The folders of runners that no longer run (a killed runner's job folders included), but their logs."""
        if not self.home.is_dir():
            return
        with self._leftovers_lock:  # one at a time (each runner's start begins one)
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        running = {inst.runner_name for inst in self.list()}
        for folder in self.home.iterdir():
            if folder.name in running or not folder.is_dir() or read_record(folder / RECORD) is not None:
                continue
            if not (folder / RECORD).exists():
                continue  # not made by this backend (or being made right now)
            try:
                job_user.forget(folder)  # its jobs' folders, when they were elsewhere (jobs run as another user)
            except OSError as e:
                log.warning("could not remove the job folders of runner %s: %s", folder.name, e)
            for item in folder.iterdir():
                if item.name == "runner.log":
                    continue
                if item.is_dir() and not item.is_symlink():
                    remove(item)
                else:
                    item.unlink(missing_ok=True)

    def describe_failure(self, runner_name: str) -> str:
        log = self.home / runner_name / "runner.log"
        try:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return f"no log at {log}"
        return f"its log {log} ends: {lines[-1][:300]}" if lines else f"its log {log} is empty"

    def release_jobs(self, job_ids: list[str]) -> None:
        """Jobs whose runner died: their containers (if any) must not run on."""
        if not job_ids or not self._resources.docker:
            return
        from dstack.runner.executors.orphans import remove_orphans

        remove_orphans()

    def shutdown(self, grace: float | None = None) -> None:
        """SIGTERM every runner (its job is stopped, its artifacts saved, its container removed), SIGKILL those
        left after `grace` (default: the stop grace of jobs and 10 s more)."""
        if grace is None:
            grace = runner_stop_wait()
        self._end_spare()
        entries = [e for e in self._procs.values() if self._running(*e)]
        for proc, _, _ in entries:
            if proc is not None:
                proc.terminate()
        # those an earlier server process started are not our children: by their records, on the same deadline
        adopted = [(int(inst.id), started) for proc, inst, started in entries if proc is None]
        deadline = time.monotonic() + grace
        terminate_all(adopted, grace)
        for proc, _, _ in entries:
            if proc is not None:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
        self._procs.clear()
        self.remove_leftovers()  # those killed earlier left theirs (their job folders elsewhere included)
