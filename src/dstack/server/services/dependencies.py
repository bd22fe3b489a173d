"""Dependencies: `workflow:tag`, `:tag`, `workflow` (its latest DONE run) or a run name -> saved artifacts."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.errors import Conflict, NotFound
from dstack.core.models import DependencyRef, DependencySpec, JobStatus
from dstack.server.db.tables import JobRow, RunRow, TagRow


async def _run_for(s: AsyncSession, repo_id: str, ref: str) -> RunRow:
    workflow, sep, tag = ref.partition(":")
    if sep:
        q = select(TagRow).where(TagRow.repo_id == repo_id, TagRow.name == tag)
        if workflow:
            q = q.where(TagRow.workflow == workflow)
        tags = (await s.scalars(q)).all()
        if not tags:
            hint = f"tag a run of '{workflow}' first: dstack tag RUN {tag}" if workflow else f"dstack tag RUN {tag}"
            whose = f"no run of '{workflow}'" if workflow else "no run"
            raise NotFound(f"dependency '{ref}': {whose} is tagged '{tag}'",
                           hint=hint)
        if len(tags) > 1:
            names = ", ".join(f"{t.workflow}:{t.name}" for t in tags)
            raise Conflict(f"dependency '{ref}' is ambiguous: {names}", hint="write it as workflow:tag")
        return await s.get(RunRow, tags[0].run_name)
    run = await s.get(RunRow, ref)
    if run is not None and run.repo_id == repo_id:
        if run.status != JobStatus.DONE.value:
            raise Conflict(f"dependency '{ref}': the run is {run.status}, not DONE")
        return run
    run = await s.scalar(
        select(RunRow)
        .where(RunRow.repo_id == repo_id, RunRow.workflow == ref, RunRow.status == JobStatus.DONE.value)
        .order_by(RunRow.submitted_at.desc())
        .limit(1)
    )
    if run is None:
        raise NotFound(f"dependency '{ref}': no DONE run of workflow '{ref}' and no run of that name",
                       hint=f"run it first: dstack run {ref}")
    return run


async def resolve(s: AsyncSession, repo_id: str, deps: list[DependencySpec]) -> list[DependencyRef]:
    out = []
    for dep in deps:
        run = await _run_for(s, repo_id, dep.ref)
        if run.status != JobStatus.DONE.value:
            raise Conflict(f"dependency '{dep.ref}' is run {run.name}, which is {run.status}, not DONE")
        jobs = (await s.scalars(select(JobRow).where(JobRow.run_name == run.name))).all()
        for job in jobs:
            by_path = {a["path"]: a.get("manifest") for a in (job.saved_artifacts or [])}
            saved = list(by_path)
            wanted = saved if dep.artifacts is None else dep.artifacts
            missing = [a for a in wanted if a not in saved]
            if missing:
                raise NotFound(f"dependency '{dep.ref}': run {run.name} saved no artifact '{missing[0]}'",
                               hint=f"it saved: {', '.join(saved) or 'nothing'}")
            out.append(DependencyRef(ref=dep.ref, run_name=run.name, job_id=job.job_id, artifacts=wanted,
                                     manifests={a: by_path[a] for a in wanted if by_path.get(a)}, into=dep.into))
    return out
