"""The server's services on a real database, SQLite and PostgreSQL alike, in this process: submitting a workflow
from its files, runs that share a name, code the server lacks, and what a finished job's last log poll carries."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

import pytest
from sqlalchemy import event, inspect, select

from dstack.core.code import CodeSnapshot
from dstack.core.errors import ConfigError, MissingCode, error_from_dict
from dstack.core.models import Job, JobStatus, JobUpdate, RunnerRegistration, RunRequest
from dstack.core.resources import RunnerResources
from dstack.server.context import Context, Settings
from dstack.server.db.session import make_engine, make_sessionmaker, migrate
from dstack.server.db.tables import JobRow
from dstack.server.routers.runs import MAX_REASON, final_headers
from dstack.server.services import jobs, runners, runs, scheduler, tags
from dstack.server.services.code import CodeBlobs
from dstack.storage.blobstore import open_store

WORKFLOWS = "workflows:\n  - name: a\n    commands: [echo $RUN_NAME]\n    resources: {memory: 1GB}\n"


def _serve(tmp_path: Path, body, url: str) -> None:
    async def main():
        await asyncio.to_thread(migrate, url)
        engine = make_engine(url)
        settings = Settings(home=tmp_path, db_url=url, token="t")
        ctx = Context(settings=settings, sessions=make_sessionmaker(engine), store=open_store(settings.store_config),
                      code=CodeBlobs(tmp_path / "code"))
        jobs.ensure_dirs(ctx)
        resources = RunnerResources(cpus=2, memory_mib=4096, docker=False)
        await runners.register(ctx, RunnerRegistration(name="r-1", hostname="h", backend="local",
                                                       resources=resources))
        try:
            await body(ctx)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def _chunks(*parts: bytes):
    for p in parts:
        yield p


def _request(**kw) -> RunRequest:
    return RunRequest(**{"repo_id": "repo", "workflow": "a", "files": {".dstack/workflows.yaml": WORKFLOWS}, **kw})


def test_a_submitted_run_is_answered_whole_from_the_rows_it_inserted(tmp_path, db_url):
    async def body(ctx):
        run = await runs.run_workflow(ctx, _request())
        assert run.jobs[0].spec.env["RUN_NAME"] == run.run_name
        assert run.jobs[0].spec.requirements.memory_mib == 1024
        assert run.model_dump(mode="json") == (await runs.get_run(ctx, None, run.run_name)).model_dump(mode="json")
        sub = runs.RunSubmission(run_name="other-run-1", repo_id="repo", workflow="a", provider="bash",
                                 jobs=[run.jobs[0].spec.model_copy(update={"job_id": "1" * 12})])
        async with ctx.sessions() as s:
            row = await runs._insert(s, sub, [])
            await s.commit()
            assert not inspect(row).unloaded and not inspect(row.jobs[0]).unloaded  # nothing to load lazily

    _serve(tmp_path, body, db_url)


def test_submissions_that_take_one_name_at_once_are_told_to_retry(tmp_path, db_url):
    async def body(ctx):
        first = await runs.run_workflow(ctx, _request())
        old = await runs.get_run(ctx, None, first.run_name)
        sub = runs.RunSubmission(run_name="same-name-1", repo_id="repo", workflow="a", provider="bash",
                                 jobs=[old.jobs[0].spec.model_copy(update={"job_id": f"{i:012x}"}) for i in (1,)])
        other = sub.model_copy(update={"jobs": [sub.jobs[0].model_copy(update={"job_id": "0" * 11 + "2"})]})
        results = await asyncio.gather(runs.submit(ctx, sub), runs.submit(ctx, other), return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["NameTaken", "Run"], results

    _serve(tmp_path, body, db_url)


def test_code_the_server_lacks_is_asked_for_once_the_run_is_sound(tmp_path, db_url):
    blob = hashlib.sha256(b"tar").hexdigest()
    code = CodeSnapshot(mode="archive", archive_hash=blob, tree_hash="0" * 64)

    async def body(ctx):
        with pytest.raises(ConfigError):  # a mistake comes back first, before any upload
            await runs.run_workflow(ctx, _request(workflow="nope", code=code))
        with pytest.raises(MissingCode) as info:
            await runs.run_workflow(ctx, _request(code=code))
        assert info.value.blobs == [blob] and error_from_dict(info.value.to_dict()).blobs == [blob]
        assert await runs.list_runs(ctx, "repo", None) == ([], 0)
        await ctx.code.put(blob, _chunks(b"tar"))
        assert (await runs.run_workflow(ctx, _request(code=code))).code == code

    _serve(tmp_path, body, db_url)


@pytest.mark.parametrize(("files", "message"), [
    ({f".dstack/workflows/{i}.yaml": "" for i in range(300)}, "more than 256"),
    ({"../../etc/passwd": "x"}, "not a file of .dstack/"),
    ({".dstack/workflows.yaml": "#" * (1 << 20) + "\n"}, "larger than 1 MiB"),
])
def test_files_from_the_network_are_checked(tmp_path, db_url, files, message):
    async def body(ctx):
        with pytest.raises(ConfigError, match=message):
            await runs.run_workflow(ctx, _request(files=files))

    _serve(tmp_path, body, db_url)


def test_a_finished_jobs_outcome_survives_the_headers():
    t = datetime(2026, 1, 1, tzinfo=UTC)
    reason = "échec: 100% of the disk ✗ " + "x" * 5000
    job = Job(job_id="j", run_name="r", workflow="w", status=JobStatus.FAILED, submitted_at=t, started_at=t,
              finished_at=t.replace(second=3), exit_code=3, reason=reason)
    headers = final_headers(job)
    assert all(v.isascii() for v in headers.values())
    assert headers["X-Job-Exit-Code"] == "3" and headers["X-Job-Seconds"] == "3.000"
    assert unquote(headers["X-Job-Reason"]) == reason[:MAX_REASON]


def test_the_last_output_sent_with_the_final_status_reaches_a_follower_in_one_answer(tmp_path, db_url):
    async def body(ctx):
        run = await runs.run_workflow(ctx, _request())
        job_id = run.jobs[0].job_id
        assert (await scheduler.take_job(ctx, "r-1", 0)).job_id == job_id
        await jobs.update_status(ctx, "r-1", job_id, JobUpdate(status=JobStatus.RUNNING))
        jobs.append_logs(ctx, job_id, b"first\r\n")
        follower = asyncio.create_task(jobs.wait_logs(ctx, job_id, 7, 10.0))  # waits past "first"
        await asyncio.sleep(0.05)
        # over HTTP, as the runner sends it: the bytes travel as base64 in the JSON body
        update = JobUpdate.model_validate(
            JobUpdate(status=JobStatus.DONE, exit_code=0, logs=b"last \xff\r\n").model_dump(mode="json"))
        assert await jobs.update_status(ctx, "r-1", job_id, update) == JobStatus.DONE
        data, job, more = await asyncio.wait_for(follower, 5)
        assert (data, job.status, more) == (b"last \xff\r\n", JobStatus.DONE, False)
        assert jobs.read_logs(ctx, job_id, 0) == b"first\r\nlast \xff\r\n"

    _serve(tmp_path, body, db_url)


def test_a_follower_that_names_the_status_it_saw_learns_of_a_change_it_missed_between_polls(tmp_path, db_url):
    async def body(ctx):
        run = await runs.run_workflow(ctx, _request())
        job_id = run.jobs[0].job_id
        await scheduler.take_job(ctx, "r-1", 0)
        data, job, _ = await jobs.wait_logs(ctx, job_id, 0, 0)
        assert job.status == JobStatus.PROVISIONING
        await jobs.update_status(ctx, "r-1", job_id, JobUpdate(status=JobStatus.RUNNING))  # nobody polls now
        started = asyncio.get_running_loop().time()
        data, job, _ = await jobs.wait_logs(ctx, job_id, 0, 5.0, seen=JobStatus.PROVISIONING)
        assert (data, job.status) == (b"", JobStatus.RUNNING)
        assert asyncio.get_running_loop().time() - started < 1  # at once, not after the 5 s
        data, job, _ = await jobs.wait_logs(ctx, job_id, 0, 0.2)  # without it: only bytes or the end answer
        assert job.status == JobStatus.RUNNING

    _serve(tmp_path, body, db_url)


def test_a_final_report_sent_again_adds_no_output_and_a_late_one_after_the_janitor_adds_its_output(tmp_path, db_url):
    async def body(ctx):
        for first, then, logged in [
            # the runner retried a report that had arrived: nothing twice
            (JobUpdate(status=JobStatus.DONE, exit_code=0, logs=b"end\r\n"), None, b"end\r\n"),
            # the job was failed for a silent runner, whose report comes late: its output is kept, not its word
            (None, JobUpdate(status=JobStatus.DONE, exit_code=0, logs=b"late\r\n"), b"late\r\n"),
        ]:
            run = await runs.run_workflow(ctx, _request())
            job_id = run.jobs[0].job_id
            await scheduler.take_job(ctx, "r-1", 0)
            if first is not None:
                assert await jobs.update_status(ctx, "r-1", job_id, first) == JobStatus.DONE
                assert await jobs.update_status(ctx, "r-1", job_id, first) == JobStatus.DONE
            else:
                await runners.fail_jobs_of(ctx, ["r-1"], "runner r-1 stopped responding")
                assert await jobs.update_status(ctx, "r-1", job_id, then) == JobStatus.FAILED
                await runners.register(ctx, RunnerRegistration(name="r-1", hostname="h", backend="local",
                                                               resources=RunnerResources(cpus=2, memory_mib=4096,
                                                                                         docker=False)))
            assert jobs.read_logs(ctx, job_id, 0) == logged

    _serve(tmp_path, body, db_url)


def test_output_sent_again_from_its_offset_is_appended_once(tmp_path, db_url):
    """A batch the runner sends again (its answer was lost) adds only the bytes the log lacks, whether the
    first send arrived whole or not."""
    async def body(ctx):
        run = await runs.run_workflow(ctx, _request())
        job_id = run.jobs[0].job_id
        jobs.append_logs(ctx, job_id, b"A" * 10, offset=0)
        jobs.append_logs(ctx, job_id, b"A" * 10, offset=0)  # the same batch again: nothing
        jobs.append_logs(ctx, job_id, b"A" * 10 + b"B" * 5, offset=0)  # a longer resend: only what is new
        jobs.append_logs(ctx, job_id, b"B" * 5 + b"C", offset=10)  # overlaps the end
        jobs.append_logs(ctx, job_id, b"D", offset=16)
        assert jobs.read_logs(ctx, job_id, 0) == b"A" * 10 + b"B" * 5 + b"C" + b"D"

    _serve(tmp_path, body, db_url)


def test_a_heartbeat_that_runs_no_job_gets_back_the_job_it_was_given_and_never_started(tmp_path, db_url):
    """The runner was given a job (it says so) but runs none: the job never started there (no output), so it
    is queued again; a job it started (it has output) fails, saying that its end was never reported."""
    async def body(ctx):
        await runners.register(ctx, RunnerRegistration(name="r-1", hostname="h", backend="local",
                                                       resources=RunnerResources(cpus=2, memory_mib=4096,
                                                                                 docker=False)))
        run = await runs.run_workflow(ctx, _request())
        job_id = run.jobs[0].job_id
        await scheduler.take_job(ctx, "r-1", 0)
        await runners.heartbeat(ctx, "r-1", [], last_taken=None)  # the take's answer may be on its way
        assert (await runs.get_job(ctx, job_id)).status == JobStatus.PROVISIONING
        await runners.heartbeat(ctx, "r-1", [], last_taken=job_id)
        job = await runs.get_job(ctx, job_id)
        assert job.status == JobStatus.SUBMITTED and job.runner is None
        assert await scheduler.take_job(ctx, "r-1", 0) is not None  # and it can be taken again
        jobs.append_logs(ctx, job_id, b"started\n")
        await runners.heartbeat(ctx, "r-1", [], last_taken=job_id)
        job = await runs.get_job(ctx, job_id)
        assert job.status == JobStatus.FAILED and "never reported" in job.reason

    _serve(tmp_path, body, db_url)


def test_many_runners_taking_at_once_never_get_one_job_twice(tmp_path, db_url):
    """20 runners poll `take` at once, again and again, until 60 queued jobs are gone: each job goes to exactly
    one runner, and no runner holds two (on PostgreSQL the sessions interleave for real)."""
    names = [f"r-{i}" for i in range(20)]

    async def body(ctx):
        for name in names:
            await runners.register(ctx, RunnerRegistration(name=name, hostname="h", backend="local",
                                                           resources=RunnerResources(cpus=2, memory_mib=4096,
                                                                                     docker=False)))
        submitted = {(await runs.run_workflow(ctx, _request())).jobs[0].job_id for _ in range(60)}
        given: list[tuple[str, str]] = []
        lost = []  # takes that found their job taken by another meanwhile: the race did happen

        @event.listens_for(ctx.sessions.kw["bind"].sync_engine, "after_cursor_execute")
        def _count(_conn, cursor, statement, *_):
            if statement.startswith("UPDATE jobs") and "runner_name" in statement.split("WHERE")[0]:
                lost.extend([1] if cursor.rowcount == 0 else [])

        async def poll(name: str) -> None:
            while True:
                job = await scheduler.take_job(ctx, name, 0)
                if job is None:
                    return
                given.append((job.job_id, name))
                await jobs.update_status(ctx, name, job.job_id, JobUpdate(status=JobStatus.DONE, exit_code=0))

        await asyncio.gather(*(poll(name) for name in names))
        assert sorted(j for j, _ in given) == sorted(submitted)  # every job once
        async with ctx.sessions() as s:
            rows = (await s.scalars(select(JobRow))).all()
        assert {r.job_id: r.runner_name for r in rows} == dict(given)
        assert len({name for _, name in given}) > 1
        assert not lost  # takes go one at a time (ctx.take_lock): none found its job taken by another

    _serve(tmp_path, body, db_url)


def test_a_runs_jobs_keep_their_order_after_updates(tmp_path, db_url):
    """A run's jobs are listed in the order its provider made them, also once some were updated (PostgreSQL
    returns rows that tie on the ordering column in the order that its last updates left them)."""
    async def body(ctx):
        spec = (await runs.run_workflow(ctx, _request())).jobs[0].spec
        ids = [f"{i:012x}" for i in (9, 3, 7, 1)]
        await runs.submit(ctx, runs.RunSubmission(
            run_name="multi-1", repo_id="repo", workflow="a", provider="bash",
            jobs=[spec.model_copy(update={"job_id": i, "run_name": "multi-1"}) for i in ids]))
        for job_id in ids[:2]:
            await runs.stop(ctx, None, job_id, abort=False)
        assert [j.job_id for j in (await runs.get_run(ctx, None, "multi-1")).jobs] == ids

    _serve(tmp_path, body, db_url)


def test_a_dependency_written_with_the_longest_names_is_recorded(tmp_path, db_url):
    """`workflow:tag` with a workflow name and a tag of the longest lengths (200 each): the run that depends on
    it records it (PostgreSQL holds a text column to its length, SQLite does not)."""
    workflow, tag = "w" * 200, "t" * 200
    files = {".dstack/workflows.yaml": f"workflows:\n  - name: {workflow}\n    commands: [true]\n"
                                      f"    artifacts: [data]\n  - name: b\n    commands: [true]\n"
                                      f"    dependencies: ['{workflow}:{tag}']\n"}

    async def body(ctx):
        first = await runs.run_workflow(ctx, _request(workflow=workflow, files=files))
        job_id = (await scheduler.take_job(ctx, "r-1", 0)).job_id
        await jobs.update_status(ctx, "r-1", job_id, JobUpdate(status=JobStatus.DONE, exit_code=0, artifacts=[
            {"path": "data", "manifest": "0" * 64, "files": 0, "size": 0}]))
        await tags.add_tag(ctx, "repo", first.run_name, tag)
        second = await runs.run_workflow(ctx, _request(workflow="b", files=files))
        assert [d.ref for d in second.dependencies] == [f"{workflow}:{tag}"]
        assert (await runs.get_run(ctx, None, first.run_name)).used_by == [second.run_name]

    _serve(tmp_path, body, db_url)


def test_a_runs_jobs_that_end_at_once_leave_it_done(tmp_path, db_url):
    """Two jobs of a run, on two runners, report DONE at the same moment: the run is DONE (on PostgreSQL each
    report's transaction would otherwise read the other job as still running, and the run stay RUNNING)."""
    async def body(ctx):
        await runners.register(ctx, RunnerRegistration(name="r-2", hostname="h", backend="local",
                                                       resources=RunnerResources(cpus=2, memory_mib=4096,
                                                                                 docker=False)))
        spec = (await runs.run_workflow(ctx, _request())).jobs[0].spec
        for n in range(10):
            name, ids = f"pair-{n}", [f"{n:06x}{i:06x}" for i in (1, 2)]
            await runs.submit(ctx, runs.RunSubmission(
                run_name=name, repo_id="repo", workflow="a", provider="bash",
                jobs=[spec.model_copy(update={"job_id": i, "run_name": name}) for i in ids]))
            async with ctx.sessions() as s:  # each job running on a runner of its own
                for job_id, runner in zip(ids, ("r-1", "r-2"), strict=True):
                    row = await s.get(JobRow, job_id)
                    row.runner_name, row.status = runner, JobStatus.RUNNING.value
                await s.commit()
            await asyncio.gather(*(jobs.update_status(ctx, runner, job_id, JobUpdate(status=JobStatus.DONE,
                                                                                      exit_code=0))
                                   for job_id, runner in zip(ids, ("r-1", "r-2"), strict=True)))
            assert (await runs.get_run(ctx, None, name)).status == JobStatus.DONE, n

    _serve(tmp_path, body, db_url)


def test_takes_of_one_runner_at_once_never_give_one_gpu_twice(tmp_path, db_url):
    """A runner whose take is sent again while the first is still served (a client-side time-out): the takes
    go one at a time, so the second counts the GPU the first gave."""
    from dstack.core.resources import Gpu

    async def body(ctx):
        await runners.register(ctx, RunnerRegistration(
            name="one-gpu", hostname="h", backend="local",
            resources=RunnerResources(cpus=8, memory_mib=4096, gpus=[Gpu(name="NVIDIA A100", memory_mib=40960)])))
        gpu_job = "workflows:\n  - name: a\n    commands: [nvidia-smi]\n    resources: {gpu: 1}\n"
        for _ in range(4):
            await runs.run_workflow(ctx, _request(files={".dstack/workflows.yaml": gpu_job}))
        taken = await asyncio.gather(*(scheduler.take_job(ctx, "one-gpu", 0) for _ in range(4)))
        given = [job for job in taken if job is not None]
        assert len(given) == 1 and given[0].gpu_indexes == [0], given

    _serve(tmp_path, body, db_url)
