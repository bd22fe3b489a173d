"""Runs: naming, submission (dependencies resolved, resources checked), listing, stopping."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import UTC, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from dstack.config import outputs
from dstack.config.files import ProjectFiles, require_unicode
from dstack.config.workflows import ResolvedWorkflow, command_line, resolve_workflow
from dstack.core.errors import (
    ConfigError,
    Conflict,
    DstackError,
    MissingCode,
    NotFound,
    Unsatisfiable,
    did_you_mean,
)
from dstack.core.models import (
    FINISHED,
    ArtifactFolders,
    ArtifactFoldersRequest,
    DependencyRef,
    Job,
    JobStatus,
    Run,
    RunRequest,
    RunSubmission,
)
from dstack.core.names import job_id as new_job_id
from dstack.core.names import random_base
from dstack.core.resources import RunnerResources
from dstack.core.sizes import plural
from dstack.server.context import Context
from dstack.server.db.tables import InputRow, InstanceRow, JobRow, RunnerRow, RunRow
from dstack.server.services import dependencies, gangs, refusals, scheduler, tags
from dstack.server.services.convert import job_model, run_model
from dstack.server.services.run_state import now, refresh_run_status


async def reserve_name(ctx: Context) -> str:
    """`adjective-animal-N`: N is one more than the runs already named so."""
    base = random_base()
    async with ctx.sessions() as s:
        count = await s.scalar(select(func.count()).select_from(RunRow).where(RunRow.name.like(f"{base}-%")))
    return f"{base}-{(count or 0) + 1}"


async def run_workflow(ctx: Context, req: RunRequest) -> Run:
    """Resolve the request's workflow from its files (variables, provider, job specs) and submit it."""
    files = ProjectFiles(texts=req.files, root=req.project)
    files.check()
    overrides, run_args = await asyncio.to_thread(command_line, files, req.workflow, req.args)
    for _ in range(5):
        run_name = await reserve_name(ctx)
        # in a thread: a large file takes a while to parse, and the server goes on answering meanwhile
        resolved = await asyncio.to_thread(_resolve, files, req, overrides, run_name, run_args)
        sub = RunSubmission(run_name=run_name, repo_id=req.repo_id, workflow=req.workflow,
                            provider=resolved.provider, variables=resolved.variables, overrides=overrides,
                            dependencies=resolved.dependencies, jobs=resolved.jobs, code=req.code, tag=req.tag)
        try:
            run = await submit(ctx, sub, functools.partial(_at, resolved))
        except NameTaken:
            continue  # another submission took the name meanwhile
        except DstackError as e:
            raise _located(e, resolved) from None
        run.warnings = resolved.warnings + run.warnings
        return run
    raise Conflict("could not find a free run name", hint="submit again")


def _resolve(files: ProjectFiles, req: RunRequest, overrides: dict, run_name: str,
             run_args: str = "") -> ResolvedWorkflow:
    require_unicode([*req.args, req.workflow, req.repo_id, req.tag or ""], "the argument")
    resolved = resolve_workflow(files, req.workflow, overrides, run_name, run_args=run_args, args=req.args)
    require_unicode([resolved.variables, *(job.model_dump() for job in resolved.jobs)], "the value")
    return resolved


def _at(resolved: ResolvedWorkflow, key: str, text: str) -> str:
    """A warning about resource `key`, at its file:line:column."""
    place = resolved.resource_source(key)[0] if resolved.entry is not None else None
    return f"{place.location}: warning: {text}" if place is not None and place.location else f"warning: {text}"


class NameTaken(Conflict):
    pass


def _located(e: DstackError, resolved: ResolvedWorkflow) -> DstackError:
    """A dependency that could not be resolved, pointed at where the workflow names it; when it names a
    workflow the project does not have, the hint says so rather than "run it first". Resources that no runner
    has, pointed at where the workflow asks for them, with what would fit."""
    if isinstance(e, Unsatisfiable) and resolved.entry is not None:
        return refusals.located(e, resolved)
    for ref, loc in resolved.dependency_errors.items():
        if f"'{ref}'" in e.message:
            hint = e.hint
            workflow = ref.split(":")[0]
            if isinstance(e, NotFound) and workflow and workflow not in resolved.workflow_names:
                hint = (f"the project has no workflow '{workflow}'"
                        + (f"; {close}" if (close := did_you_mean(workflow, resolved.workflow_names)) else
                           f" (workflows: {', '.join(resolved.workflow_names)})"))
            return ConfigError(e.message, hint=hint, file=loc.file, line=loc.line, column=loc.column)
    return e


async def submit(ctx: Context, sub: RunSubmission,
                 say: Callable[[str, str], str] = lambda _key, text: f"warning: {text}") -> Run:
    """Queue the run once it is sound. `say(resource, text)`: a warning about a resource, as a line to show."""
    if sub.tag is not None:
        tags.check_name(sub.tag)
    warnings = []
    for job in sub.jobs:
        warnings += await scheduler.check_satisfiable(ctx, job)
    async with ctx.sessions() as s:
        resolved = await dependencies.resolve(s, sub.repo_id, sub.dependencies)
        # last of the checks: a client uploads the code only for a run that is otherwise sound
        missing = [h for h in (sub.code.blob_hashes() if sub.code else []) if not ctx.code.has(h)]
        if missing:
            raise MissingCode(f"the server lacks {plural(len(missing), 'blob')} of the run's code", blobs=missing,
                              hint="upload them (PUT /api/code/HASH) and submit again")
        try:
            row = await _insert(s, sub, resolved)
            await s.commit()
        except IntegrityError:  # e.g. two submissions took the same name at once
            await s.rollback()
            if await s.get(RunRow, sub.run_name) is None:
                raise
            raise NameTaken(f"a run named '{sub.run_name}' exists already", hint="submit again") from None
        run = run_model(row)  # as get_run would read it back
    ctx.signals.notify("jobs")
    run.warnings = list(dict.fromkeys(say(key, text) for key, text in warnings))
    return run


async def reproduce(ctx: Context, repo_id: str | None, name: str) -> Run:
    """A new run of a past run's exact inputs: its code, variables, image digest and dependencies (the
    same jobs' artifacts, not what their tags point at now)."""
    old = await get_run(ctx, repo_id, name)
    new_name = await reserve_name(ctx)
    jobs = []
    for job in old.jobs:
        spec = job.spec.model_copy(deep=True)
        spec.job_id, spec.run_name = new_job_id(), new_name
        spec.env = {**spec.env, "RUN_NAME": new_name, "JOB_ID": spec.job_id}
        if spec.image and job.image_digest:
            spec.image = job.image_digest
        jobs.append(spec)
    sub = RunSubmission(run_name=new_name, repo_id=old.repo_id, workflow=old.workflow, provider=old.provider,
                        variables=old.variables, overrides=old.overrides, jobs=jobs, code=old.code)
    for job in jobs:
        await scheduler.check_satisfiable(ctx, job)
    async with ctx.sessions() as s:
        for dep in old.dependencies:
            if await s.get(JobRow, dep.job_id) is None:
                raise Conflict(f"cannot reproduce {old.run_name}: its input {dep.run_name} ({dep.ref}) is gone",
                               hint="runs that others depend on are kept by `dstack prune` only while tagged")
        await _insert(s, sub, old.dependencies, reproduces=old.run_name)
        await s.commit()
    ctx.signals.notify("jobs")
    return await get_run(ctx, repo_id, new_name)


async def _insert(s, sub: RunSubmission, resolved: list[DependencyRef], reproduces: str | None = None) -> RunRow:
    """The run and its jobs, added to the session `s` (not committed); the run's row holds its jobs."""
    if await s.get(RunRow, sub.run_name):
        raise NameTaken(f"a run named '{sub.run_name}' exists already", hint="submit again for a new name")
    submitted = now()
    rows = []
    for i, job in enumerate(sub.jobs):
        job.dependencies = resolved
        job.code = sub.code
        job.repo_id = sub.repo_id
        rows.append(JobRow(
            # a microsecond apart, in the provider's order: a run's jobs are read back ordered by this time, and a
            # tie is no order at all (PostgreSQL returns tied rows in whatever order its last updates left them)
            job_id=job.job_id, run_name=sub.run_name, workflow=sub.workflow, status=JobStatus.SUBMITTED.value,
            submitted_at=submitted + timedelta(microseconds=i), spec=job.model_dump(mode="json"),
            started_at=None, finished_at=None, runner_name=None, exit_code=None, reason=None,
            stop_requested=None, image_digest=None, saved_artifacts=[], ports=[], runner_resources=None,
        ))
    run = RunRow(
        name=sub.run_name, repo_id=sub.repo_id, workflow=sub.workflow, provider=sub.provider,
        status=JobStatus.SUBMITTED.value, submitted_at=submitted, variables=sub.variables,
        overrides=sub.overrides, dependencies=[d.model_dump() for d in resolved],
        code=sub.code.to_dict() if sub.code else None, tag_when_done=sub.tag, reproduces=reproduces,
        jobs=rows, tags=[],
    )
    s.add(run)
    await s.flush()  # the run before the rows that name it
    for dep in resolved:
        s.add(InputRow(run_name=sub.run_name, input_run=dep.run_name, job_id=dep.job_id, ref=dep.ref))
    return run


def _runs_query(repo_id: str | None, with_specs: bool = True):
    jobs = selectinload(RunRow.jobs)
    if not with_specs:
        jobs = jobs.defer(JobRow.spec)
    q = select(RunRow).options(jobs, selectinload(RunRow.tags))
    return q.where(RunRow.repo_id == repo_id) if repo_id else q


async def list_runs(ctx: Context, repo_id: str | None, limit: int | None,
                    workflow: str | None = None) -> tuple[list[Run], int]:
    """The newest runs (at most `limit`), and how many there are in all."""
    q = _runs_query(repo_id, with_specs=False).order_by(RunRow.submitted_at.desc())
    count = select(func.count()).select_from(RunRow)
    if repo_id:
        count = count.where(RunRow.repo_id == repo_id)
    if workflow:
        q = q.where(RunRow.workflow == workflow)
        count = count.where(RunRow.workflow == workflow)
    if limit:
        q = q.limit(limit)
    async with ctx.sessions() as s:
        rows = (await s.scalars(q)).all()
        total = len(rows) if not limit or len(rows) < limit else await s.scalar(count)
    found = [_unrecorded(ctx, run_model(r, with_specs=False)) for r in rows]
    await _costs(ctx, found)
    return found, total


async def _costs(ctx: Context, runs: list[Run]) -> None:
    """Each job's cost: the hourly price of the instance its runner is, times the time it ran (until now, for
    one that runs)."""
    names = {j.runner for r in runs for j in r.jobs if j.runner}
    if not names:
        return
    async with ctx.sessions() as s:
        prices = dict((await s.execute(select(InstanceRow.runner_name, InstanceRow.offer).where(
            InstanceRow.runner_name.in_(names)))).all())
    for run in runs:
        for job in run.jobs:
            price = float((prices.get(job.runner) or {}).get("price") or 0)
            if price and job.started_at is not None:
                held = ((job.finished_at or now().replace(tzinfo=UTC)) - job.started_at).total_seconds()
                job.cost = round(price * max(0.0, held) / 3600, 6)


def _unrecorded(ctx: Context, run: Run) -> Run:
    """An unfinished job whose end its runner reported but the server could not write down says so; a queued
    job, what the autoscaler does for it or why it cannot (a limit reached, a backend whose runners exit at
    once)."""
    failing = "; ".join(why for _, _, why in ctx.start_failures.values())
    for job in run.jobs:
        if job.job_id in ctx.unrecorded and not job.status.finished:
            job.reason = ctx.unrecorded[job.job_id]
        elif job.status == JobStatus.SUBMITTED and job.runner is None and (ctx.waiting.get(job.job_id) or failing):
            waiting = ctx.waiting.get(job.job_id) or failing  # after why it is queued again, if it is (retry)
            job.reason = f"{job.reason}; {waiting}" if job.reason else waiting
    return run


async def get_run(ctx: Context, repo_id: str | None, name: str) -> Run:
    async with ctx.sessions() as s:
        row = await s.scalar(_runs_query(repo_id).where(RunRow.name == name))
        if row is None:
            job = await s.get(JobRow, name)
            if job is None and len(name) >= 4 and all(c in "0123456789abcdef" for c in name):
                jobs = (await s.scalars(select(JobRow).where(JobRow.job_id.like(f"{name}%")).limit(2))).all()
                if len(jobs) > 1:
                    raise Conflict(f"'{name}' is the start of several job ids", hint="type more of it")
                job = jobs[0] if jobs else None
            if job is not None:
                row = await s.scalar(_runs_query(repo_id).where(RunRow.name == job.run_name))
        if row is None and repo_id:  # run names and job ids are unique on a server: one of another project
            return await get_run(ctx, None, name)
        if row is None:
            raise NotFound(f"no run or job named '{name}'", hint="`dstack status` lists runs and their jobs")
        run = _unrecorded(ctx, run_model(row))
        await _costs(ctx, [run])
        run.used_by = sorted(set((await s.scalars(select(InputRow.run_name).where(
            InputRow.input_run == row.name))).all()))
        return run


async def get_job(ctx: Context, job_id: str) -> Job:
    async with ctx.sessions() as s:
        row = await s.get(JobRow, job_id)
        if row is None:
            raise NotFound(f"no job '{job_id}'")
        job = job_model(row)
        runner = await s.get(RunnerRow, row.runner_name) if row.runner_name else None
        if runner is not None:
            job.hostname = gangs.address(runner, RunnerResources.model_validate(runner.resources))
        return job


async def stop(ctx: Context, repo_id: str | None, ref: str, abort: bool) -> Run:
    """Stop a run (all its jobs) or one job. Queued jobs end at once; running ones are told by heartbeat."""
    run = await get_run(ctx, repo_id, ref)
    job_ids = [j.job_id for j in run.jobs if j.job_id == ref] or [j.job_id for j in run.jobs]
    final = JobStatus.ABORTED if abort else JobStatus.STOPPED
    async with ctx.sessions() as s:
        for job_id in job_ids:
            job = await s.get(JobRow, job_id)
            if JobStatus(job.status) in FINISHED:
                continue
            if job.runner_name is None or (job.spec or {}).get("delivered", True) is False:  # never given
                job.status = final.value
                job.finished_at = now()
                job.reason = "stopped before it started" if not abort else "aborted before it started"
            else:
                job.stop_requested = "abort" if abort else "stop"
        await s.commit()
        await refresh_run_status(s, run.run_name)
        await s.commit()
    for job_id in job_ids:
        ctx.signals.notify(f"job:{job_id}")
    return await get_run(ctx, repo_id, run.run_name)


async def artifact_folders(req: ArtifactFoldersRequest) -> ArtifactFolders:
    """The project's artifact folders, which the CLI leaves out of the code it captures (config.outputs)."""
    files = ProjectFiles(texts=req.files)
    files.check()
    folders, saved = await asyncio.to_thread(outputs.artifact_folders, files, req.workflow)
    return ArtifactFolders(folders=folders, saved=saved)
