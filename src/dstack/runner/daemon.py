"""The runner loop: register, heartbeat, take a job, run it, report it, exit when idle for too long."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx

from dstack import __version__
from dstack.core.errors import DstackError, Unauthorized
from dstack.core.models import JobSpec, JobStatus, JobUpdate, RunnerRegistration
from dstack.core.processes import stop_grace
from dstack.core.resources import RunnerResources, visible_gpus_env
from dstack.core.sizes import human_size
from dstack.runner import job_user as job_user_mod
from dstack.runner import transfer, workspace
from dstack.runner.client import RETRYABLE, ServerClient, ServerError
from dstack.runner.code import recreate
from dstack.runner.executors.base import pick_free_ports
from dstack.runner.job_user import JobUser, JobUsers
from dstack.runner.logs import AsWritten, LogShipper
from dstack.storage.blobstore import BlobStore, LocalBlobStore
from dstack.storage.cache import DEFAULT_CACHE_SIZE, BlobCache

log = logging.getLogger("dstack.runner")
HEARTBEAT_INTERVAL = 1.0  # while it runs jobs, or as a server before 0.5 expects; an idle one, as the server says
TAKE_WAIT = 50.0  # a long poll for a job (the server holds it up to 60 s): an idle runner costs the server little
RUNNING_REPORT_DELAY = 0.1  # seconds after the start: a job that ends sooner is reported once, when it ends
MAX_REPORT_PAUSE = 5.0  # between two tries of a report the server could not take
SERVER_ERROR_TRIES = 5  # a 500 is tried this often; a server that cannot take it now (503, unreachable) is waited for
LEAVING_REPORT_WAIT = 5.0  # a runner on its way out (SIGTERM) gives up a report after this long
SPOT_POLL = 5.0  # seconds between reads of a spot machine's interruption notice (AWS advises 5)
STOP_GRACE = stop_grace()




class Slot:
    """One job of this runner: the job, its execution once started, and whether it was asked to stop."""

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.execution = None
        self.stop_requested: str | None = None
        self.locks: list = []  # of its `cache:` folders, held while it runs


class Runner:
    def __init__(self, client: ServerClient, resources: RunnerResources, workdir: Path, name: str | None = None,
                 backend: str | None = None, idle_timeout: float | None = None,
                 server_lost_timeout: float | None = 60.0, labels: dict[str, str] | None = None,
                 cache_size: int | None = DEFAULT_CACHE_SIZE, job_users: JobUsers | None = None,
                 jobs_base: Path | None = None):
        self.client = client
        self.labels = labels or {}
        self.resources = resources
        self.workdir = Path(workdir)
        self.job_users = job_users  # who runs host jobs, when not the runner's own user (runner/job_user.py)
        self.job_user = job_users.sample if job_users else None  # whose rights the jobs' folders are made for
        self.jobs_dir = job_user_mod.jobs_dir(self.workdir, self.job_user, jobs_base)
        self.name = name
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.server_lost_timeout = server_lost_timeout
        self.slots: dict[str, Slot] = {}  # the jobs it runs now, by id
        self._threads: list[threading.Thread] = []
        self.last_taken: str | None = None  # the id of the last job `take` gave this runner
        self._stopping = threading.Event()
        self._leaving_since: float | None = None  # when the runner was told to stop (SIGTERM)
        # reentrant: SIGTERM's handler (shutdown) runs in the main thread, which may hold it (starting a job)
        self._lock = threading.RLock()
        self._executors: dict[bool, object] = {}
        self.inline_logs = False  # whether the last output may travel with the final status (server >= 0.3)
        self._store = None
        self.cache_size = cache_size  # bytes of fetched blobs the runner keeps (a store it reaches over HTTP)
        self._cache: BlobCache | None = None

    def executor_for(self, job: JobSpec):
        """One executor of each kind per runner (a Docker client is worth keeping)."""
        kind = bool(job.image)
        if kind not in self._executors:
            if kind:
                from dstack.runner.executors.docker import DockerExecutor

                self._executors[kind] = DockerExecutor()
            else:
                from dstack.runner.executors.host import HostExecutor

                self._executors[kind] = HostExecutor()
        return self._executors[kind]

    @property
    def store(self) -> LocalBlobStore | transfer.Transfers:
        """The store's folder (on the server's machine, where the runner may use it), else transfers through the
        server; asked for once, when the first job needs it."""
        if self._store is None:
            self._store = transfer.open_store(self.client, self.workdir)
        return self._store

    @property
    def cache(self) -> BlobCache:
        if self._cache is None:
            self._cache = BlobCache(self.workdir / "blobs", self.cache_size)
        return self._cache

    def _job_store(self, job: JobSpec) -> BlobStore:
        store = self.store
        return store if isinstance(store, LocalBlobStore) else store.for_job(self.name, job.job_id)

    def _mounted(self, job: JobSpec, store: BlobStore) -> None:
        """After a job's dependencies are in place: say what they cost, and keep the blob cache within its
        bound (the trees that jobs mount now stay)."""
        if isinstance(store, transfer.JobStore):
            st = store.stats
            log.info("job %s: dependencies ready: downloaded %d blobs (%s, %d bytes)%s", job.job_id, st.downloaded,
                     human_size(st.downloaded_bytes), st.downloaded_bytes,
                     f", resumed after {human_size(st.resumed_bytes)} kept from a cut" if st.resumed_bytes else "")
            if st.downloaded:
                pruned = self.cache.prune(self._trees()[1], workspace.trees_in_use(self.jobs_dir))
                if pruned.bytes:
                    log.info("blob cache: removed %d blobs and %d trees (%s) to stay within %s", pruned.blobs,
                             pruned.trees, human_size(pruned.bytes), human_size(self.cache.limit or 0))

    # --- lifecycle -------------------------------------------------------------------------------

    def register(self) -> None:
        info = self.client.register(RunnerRegistration(
            hostname=socket.gethostname(), resources=self.resources, backend=self.backend, name=self.name,
            labels=self.labels, version=__version__))
        self.name = info.name
        # a server before 0.3 ignores output that travels with a final status: it gets it on its own
        self.inline_logs = self.client.version() >= (0, 3)
        log.info("registered as %s (%s)", self.name, self.resources.describe())

    def _register_patiently(self) -> None:
        """Register, waiting for a server that cannot answer yet (starting, restarting, stopping) as long as
        the runner waits for a lost server; a refusal (a wrong token) is raised at once."""
        since = None
        while True:
            try:
                self.register()
                return
            except RETRYABLE as e:
                if since is None:
                    since = time.monotonic()
                    log.warning("could not register with the server: %s; trying again until it answers", e)
                if self._lost_for_good(since):
                    raise
                if self._stopping.wait(1):
                    raise

    def _lost_for_good(self, since: float) -> bool:
        """Whether the server, unreachable since `since`, has been away too long to wait for (with no job)."""
        return self.server_lost_timeout is not None and time.monotonic() - since > self.server_lost_timeout

    def shutdown(self) -> bool:
        """Stop taking jobs; stop the running ones (their artifacts are saved). True when idle and not on the
        way out already (then the caller may interrupt the wait for a job; never the clean-up)."""
        leaving = self._stopping.is_set()
        self._leaving_since = self._leaving_since or time.monotonic()
        self._stopping.set()
        with self._lock:
            for slot in self.slots.values():  # started, or starting: stopped once it has (see _run)
                slot.stop_requested = slot.stop_requested or "stop"
                if slot.execution is not None:
                    threading.Thread(target=slot.execution.stop, args=(STOP_GRACE,), daemon=True).start()
            return not self.slots and not leaving

    def serve(self) -> None:
        if self.job_users is not None:
            self.job_users.recover()  # what jobs of a killed runner left running dies before their folders go
        self._workdir_lock = workspace.use_workdir(self.workdir, self.jobs_dir, self.job_user)
        try:
            self._register_patiently()
        except BaseException:  # refused, or stopped before it joined: it made the jobs' folder for nothing
            job_user_mod.release_jobs_dir(self.jobs_dir, self.job_user)
            raise
        if self.resources.docker:  # beside the first take, not before it: a job need not wait for the sweep
            threading.Thread(target=_remove_orphans, name="dstack-orphans", daemon=True).start()
        hb = threading.Thread(target=self._heartbeats, daemon=True)
        hb.start()
        if self.resources.interruptible:  # a spot machine: its provider's notice, while jobs run
            threading.Thread(target=self._watch_spot_notice, name="dstack-spot", daemon=True).start()
        idle_since = time.monotonic()
        unreachable_since: float | None = None
        try:
            while not self._stopping.is_set():
                try:
                    wait = TAKE_WAIT
                    if self.idle_timeout is not None:  # back in time to leave when idle (counted from the
                        # last job's end: while jobs run, the poll is short)
                        wait = min(wait, 5.0) if self.slots else min(
                            wait, max(0.0, self.idle_timeout - (time.monotonic() - idle_since)) + 0.5)
                    asked = time.monotonic()
                    job = self.client.take(self.name, wait, port=pick_free_ports(1)[0])
                    if job is None and time.monotonic() - asked < min(wait, 1.0) / 2:
                        self._stopping.wait(1.0)  # answered at once (draining: told to leave by a heartbeat)
                    if job is not None:  # its slot first: a heartbeat that sees it taken sees it running
                        slot = Slot(job)
                        with self._lock:
                            self.slots[job.job_id] = slot
                        self.last_taken = job.job_id
                    if unreachable_since is not None:
                        log.info("the server is back")
                    unreachable_since = None
                except RETRYABLE as e:  # unreachable, stopping, restarting: wait for it
                    if unreachable_since is None:
                        log.warning("waiting for the server: %s", e)
                    unreachable_since = unreachable_since or time.monotonic()
                    if not self.slots and self._lost_for_good(unreachable_since):
                        log.error("server unreachable for %ss; exiting", self.server_lost_timeout)
                        return
                    self._stopping.wait(1)
                    continue
                if job is None:
                    if self.slots:
                        idle_since = time.monotonic()
                    elif self.idle_timeout is not None and time.monotonic() - idle_since > self.idle_timeout:
                        log.info("idle for %ss; exiting", self.idle_timeout)
                        return
                    continue
                # several jobs at once, as the server gives them (it counts what each takes of this machine)
                thread = threading.Thread(target=self.run_job, args=(slot,), daemon=True)
                thread.start()
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                idle_since = time.monotonic()
        finally:
            self._stopping.set()
            self.shutdown()
            for thread in self._threads:  # their jobs are stopping: their ends are reported first
                thread.join()
            for executor in self._executors.values():
                executor.close()
            for unused in self.jobs_dir.glob("next-*"):  # the folders of containers that waited
                workspace.remove(unused)
            job_user_mod.release_jobs_dir(self.jobs_dir, self.job_user)
            try:
                self.client.deregister(self.name)
            except (httpx.HTTPError, DstackError):
                pass

    def _watch_spot_notice(self) -> None:
        """A spot machine: the provider's notice, while jobs run, is told the server once (runner/spot.py)."""
        from dstack.runner import spot

        def report(action: str, when: str | None) -> None:
            ended = self.client.interrupted(self.name, action, when)
            log.info("the server ended or requeued jobs %s", ", ".join(ended) or "(none)")

        spot.watch(lambda: bool(self.slots), self._stopping, report, (httpx.HTTPError, DstackError), SPOT_POLL)

    def _heartbeats(self) -> None:
        """Every second while jobs run here (a stop reaches them within that); idle, as often as the server says
        (its reply's `next_in`). A job taken is reported within a second."""
        every, last = HEARTBEAT_INTERVAL, float("-inf")
        while not self._stopping.wait(HEARTBEAT_INTERVAL) or self.slots:
            if not self.slots and not self._stopping.is_set() and time.monotonic() - last < every:
                continue
            last = time.monotonic()
            last_taken = self.last_taken  # before the slots (see serve): never "taken, yet not running" by mistake
            job_ids = list(self.slots)
            try:
                reply = self.client.heartbeat(self.name, job_ids, last_taken)
            except RETRYABLE:
                last = float("-inf")  # tried again in a second, not after the idle interval
                continue
            except Unauthorized as e:  # its token works no more (`dstack runners remove`): nothing to wait for
                log.error("the server no longer takes this runner's token (%s); exiting", e)
                self.shutdown()
                return
            except DstackError as e:  # e.g. forgotten by a server that lost its database: register again
                log.warning("heartbeat refused: %s", e)
                try:
                    self.register()
                except Exception:
                    pass
                continue
            except httpx.HTTPError:
                last = float("-inf")
                continue
            every = reply.next_in if reply.next_in is not None else HEARTBEAT_INTERVAL
            stops = reply.stops or ({job_ids[0]: reply.stop} if reply.stop and job_ids else {})  # a server < 0.4
            for job_id, how in stops.items():
                self._request_stop(how, job_id)
            if reply.terminate and not job_ids:  # removed (`dstack runners remove`) and idle: leave
                log.info("removed from the server; exiting")
                self.shutdown()
            if self._stopping.is_set() and not self.slots:
                return

    def _request_stop(self, how: str, job_id: str) -> None:
        """Stop (or abort) job `job_id`, if it still runs here (a late heartbeat answer about a job that has
        ended must not stop another)."""
        with self._lock:
            slot = self.slots.get(job_id)
            if slot is None:
                return
            if slot.stop_requested == "abort" or (slot.stop_requested and how == "stop"):
                return
            slot.stop_requested = how
            if slot.execution is not None:
                grace = 0.0 if how == "abort" else STOP_GRACE
                threading.Thread(target=slot.execution.stop, args=(grace,), daemon=True).start()

    # --- one job ---------------------------------------------------------------------------------

    def run_job(self, slot: Slot) -> None:
        from dstack.runner.executors.base import ExecutorError

        job = slot.job
        executor = self.executor_for(job)
        root = executor.claim(job)  # a container already waits for this job: its code goes there
        # a folder of its own for each attempt (`retry`): the last one's may still be being removed
        name = job.job_id if job.attempt == 1 else f"{job.job_id}.{job.attempt}"
        folder = root.parent if root is not None else self.jobs_dir / name
        shipper = LogShipper(lambda offset, data: self.client.logs(self.name, job.job_id, offset, data),
                             retryable=RETRYABLE, give_up=self._leaving_for)
        users = None if job.image else self.job_users  # a container's user is the image's
        host_user = None
        try:
            host_user = users.lease() if users else None
            self._run(slot, folder, shipper, executor, host_user)
        except (ExecutorError, workspace.WorkspaceError, DstackError, OSError, job_user_mod.JobUserError) as e:
            shipper.close()
            self._finish(job, JobStatus.FAILED, reason=str(e), **_started(slot.execution))
        except Exception as e:  # never leave a job hanging in RUNNING
            log.exception("job %s failed", job.job_id)
            shipper.close()
            self._finish(job, JobStatus.FAILED, reason=f"runner error: {e!r}", **_started(slot.execution))
        finally:
            shipper.close()
            executor.release(job)
            for lock in slot.locks:
                lock.close()
            with self._lock:
                execution, slot.execution = slot.execution, None
            if execution is not None:
                execution.dispose()  # its final status is reported (or could not be): its container goes
            with self._lock:
                if self.slots.get(job.job_id) is slot:  # not the next attempt's, taken meanwhile
                    del self.slots[job.job_id]
            ended = True
            if host_user is not None:
                try:
                    users.end(host_user)  # nothing of the job's own user may run while root removes its folder
                except job_user_mod.JobUserError as e:  # its folder and its uid are left as they are
                    ended = False
                    log.error("job %s: %s; its folder %s and its uid are left alone", job.job_id, e, folder)
            if ended:
                workspace.remove(folder)
                if host_user is not None:
                    users.release(host_user)
        if execution is not None and not self._stopping.is_set():  # the job is reported: get ready for the next one like it
            root = self.jobs_dir / f"next-{secrets.token_hex(6)}" / "code"
            threading.Thread(target=executor.warm, args=(job, root), daemon=True).start()

    def _finish(self, job: JobSpec, status: JobStatus, **kw) -> None:
        """The final status (with the last output, if any). A retry of a report that did arrive is recognised
        by the server and changes nothing."""
        self._report(job, status, kw)

    def _report(self, job: JobSpec, status: JobStatus, kw: dict, ended: threading.Event | None = None,
                fail: bool = False) -> JobStatus | None:
        """Every status report goes this way (see _patiently). Returns the status the server has for the job
        then (None when not delivered)."""
        kw = dict(kw)
        ended_at = kw.pop("ended_at", None)  # monotonic: sent as how long ago, so that clocks need not agree

        def send() -> JobStatus | None:
            ago = None if ended_at is None else max(0.0, time.monotonic() - ended_at)
            return self.client.update(self.name, job.job_id, JobUpdate(status=status, ended_ago=ago, **kw))

        return self._patiently(f"report {status.value} for job {job.job_id}", send, ended, fail)

    def _fetch_code(self, digest: str) -> bytes:
        """A blob of the job's code, fetched patiently (the server may be restarting)."""
        return self._patiently(f"fetch the code blob {digest[:12]}", lambda: self.client.code(digest), fail=True)

    def _patiently(self, what: str, call, ended: threading.Event | None = None, fail: bool = False):
        """call(), tried again with back-off (up to 5 s between tries) for as long as the server cannot take it
        (unreachable, restarting, stopping, its disk full), until it does; given up when the server refuses it
        (the job is not this runner's any more), when `ended` is set (a RUNNING report that the job's end
        overtook), or when the runner is on its way out and the server has been away too long. What call()
        returned; None when given up (with `fail`: the last error is raised instead)."""
        pause, failing_since, failures = 0.2, None, 0
        while True:
            try:
                answer = call()
                if failing_since is not None:
                    log.info("did %s after all", what)
                return answer
            except RETRYABLE as e:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("could not %s: %s; trying again until the server answers", what, e)
                error = e
            except ServerError as e:  # a server's own error may well come again: a few more tries only
                failures += 1
                log.warning("could not %s: %s", what, e)
                if failures >= SERVER_ERROR_TRIES:
                    if fail:
                        raise
                    return None
                failing_since, error = failing_since or time.monotonic(), e
            except (httpx.HTTPError, DstackError) as e:
                log.error("the server refused to %s: %s", what, e)
                if fail:
                    raise
                return None
            if self._leaving_for(failing_since):
                log.error("gave up to %s: the runner is stopping", what)
                if fail:
                    raise DstackError(f"could not {what}: {error}")
                return None
            if ended is None:
                time.sleep(pause)
            elif ended.wait(pause):
                return None
            pause = min(pause * 2, MAX_REPORT_PAUSE)

    def _leaving_for(self, since: float | None = None) -> bool:
        """Whether the runner is on its way out and its reports have failed since `since`, for long enough:
        LEAVING_REPORT_WAIT after it was told to stop, in all (not for each report: whoever stops it waits
        only so long before SIGKILL, and the job's container must be removed first)."""
        if self._leaving_since is None or since is None:
            return False
        return time.monotonic() - self._leaving_since > LEAVING_REPORT_WAIT

    def _trees(self) -> tuple[bool, Path]:
        """Whether the store is on this disk, and where dependency trees go: next to the store's blobs when it
        is (shared by the runners of this machine, hard links), else in this runner's folder."""
        local = isinstance(self.store, LocalBlobStore)
        return local, self.store.root / "trees" if local else self.workdir / "trees"

    def _run(self, slot: Slot, folder: Path, shipper: LogShipper, executor, host_user: JobUser | None) -> None:
        job = slot.job
        job_user_mod.job_folder(folder, host_user)
        if job.code is not None:
            root = recreate(job.code, self._fetch_code, folder / "code")
        else:
            root = folder / "code"
            root.mkdir(parents=True, exist_ok=True)
        (root / job.working_dir).mkdir(parents=True, exist_ok=True)
        job_user_mod.give(root, host_user)
        home = job_user_mod.home(folder, host_user)
        mounts = []  # the store is opened only for a job that has dependencies or artifacts
        binds = executor.binds_anywhere
        if job.dependencies:
            store = self._job_store(job)
            with self.cache.using():  # not pruned while jobs of this runner build their trees from it
                mounts = workspace.dependency_mounts(job, root, store, self._trees()[1], self.cache, binds)
            self._mounted(job, store)
        outputs, absolute = workspace.output_mounts(job, folder, binds, host_user)
        kept, slot.locks, notes = workspace.cache_mounts(job, folder, self.jobs_dir.parent / "cache", binds,
                                                         host_user, root)
        mounts = workspace.distinct(mounts + outputs + kept)
        for note in notes:
            shipper.write(f"dstack: {note}\n".encode())
        if slot.stop_requested:
            self._finish(job, JobStatus.ABORTED if slot.stop_requested == "abort" else JobStatus.STOPPED,
                         reason="stopped before it started")
            return
        with self._lock:
            output = AsWritten(shipper.write)  # the job's bytes, not its terminal's "\r\n"
            # a job on the host sees only the GPUs it asked for (in a container, Docker attaches them)
            env = job.env if job.image else {**job.env, **visible_gpus_env(job.requirements, self.resources.gpus,
                                                                           job.gpu_indexes)}
            if home is not None:
                env = {"HOME": str(home), "USER": host_user.name, "LOGNAME": host_user.name,
                       "PATH": job_user_mod.search_path(os.environ.get("PATH", "/usr/bin:/bin"), host_user), **env}
            slot.execution = executor.start(job, root, mounts, env, output,
                                            **({"user": host_user} if host_user is not None else {}))
            if slot.stop_requested:  # asked while the executor was starting
                threading.Thread(target=slot.execution.stop, args=(STOP_GRACE,), daemon=True).start()
        started = _started(slot.execution)
        # RUNNING is reported unless the job ends first: then its final status says it all, in one request
        # fewer while a short job and its container's exit compete for the CPU
        ended = threading.Event()
        running = threading.Timer(RUNNING_REPORT_DELAY, self._report_running, args=(job, started, ended))
        running.start()
        try:
            code = slot.execution.wait()
            if host_user is not None:
                self.job_users.end(host_user)  # what it left running goes before root reads its folder
                if host_user.own:  # nor may another job's uid change what root reads (or keeps) now
                    for tree in (root, folder / "outputs", *(m.source for m in kept)):
                        if tree.exists():
                            job_user_mod.take_back(tree)
        finally:
            ended.set()
            running.cancel()
            running.join()
            output.flush()
        started["ended_at"] = time.monotonic()  # what the final status says, however late it lands
        if slot.stop_requested == "abort":
            shipper.close()
            self._finish(job, JobStatus.ABORTED, exit_code=code, reason="aborted: artifacts were not saved",
                         **started)
            return
        artifacts, not_folders = [], []
        if job.artifacts:
            self._report(job, JobStatus.UPLOADING, {"exit_code": code, **started})
            local, trees = self._trees()
            store = self._job_store(job)
            artifacts, not_folders = workspace.save_artifacts(
                job, root, folder, absolute, store, adopt=local, trees=trees, cache=self.cache,
                ended_early=code != 0 or bool(slot.stop_requested), say=shipper.write)
            if isinstance(store, transfer.JobStore):
                log.info("job %s: artifacts saved: uploaded %d blobs (%s, %d bytes)", job.job_id,
                         store.stats.uploaded, human_size(store.stats.uploaded_bytes), store.stats.uploaded_bytes)
        if self.inline_logs:  # the last output goes with the final status, stored before it
            logs_offset, logs = shipper.drain()
        else:
            shipper.close()  # every line of output is on the server before the final status
            logs_offset, logs = None, None
        if job.artifacts and not_folders and not slot.stop_requested:
            names = ", ".join(f"'{p}'" for p in not_folders)
            self._finish(job, JobStatus.FAILED, exit_code=code, artifacts=artifacts, logs=logs,
                         logs_offset=logs_offset, **started,
                         reason=f"artifact {names} is a file; artifacts are folders (write the file into a "
                                f"folder and declare that folder)")
            return
        if slot.stop_requested:
            status, reason = JobStatus.STOPPED, "stopped by the user"
        elif code == 0:
            status, reason = JobStatus.DONE, None
        else:
            status, reason = JobStatus.FAILED, slot.execution.failure_reason or f"exited with code {code}"
        self._finish(job, status, exit_code=code, reason=reason, artifacts=artifacts, logs=logs,
                     logs_offset=logs_offset, **started)

    def _report_running(self, job: JobSpec, started: dict, ended: threading.Event) -> None:
        """RUNNING, retried while the server cannot take it and the job runs (a lost one would leave it
        PROVISIONING until its end); never after the job's end. A job the server has ended meanwhile (it gave
        the runner up for lost) is aborted: it must not run on beside its next try."""
        try:
            answer = self._report(job, JobStatus.RUNNING, started, ended, fail=True)
        except (httpx.HTTPError, DstackError) as e:  # refused: the job is not this runner's (any more)
            answer, why = None, str(e)
        else:
            why = answer.value if answer is not None and answer.finished else None
        if why is not None and not ended.is_set():
            log.warning("the server has ended job %s or given it to another runner (%s): aborting it",
                        job.job_id, why)
            self._request_stop("abort", job.job_id)


def _remove_orphans() -> None:
    """The containers of jobs whose runner died (executors/docker.remove_orphans)."""
    from dstack.runner.executors.orphans import remove_orphans

    try:
        for job_id in remove_orphans():
            log.info("removed the container of job %s, left by a runner that died", job_id)
    except Exception as e:  # the engine is away: the next runner's sweep has them
        log.warning("could not look for containers that dead runners left: %s", e)


def _started(execution) -> dict:
    """What a report says of a started job: the image digest it ran and the ports it was given."""
    if execution is None:
        return {}
    return {"image_digest": execution.image_digest, "ports": execution.ports or None}
