"""Rows to API models."""

from __future__ import annotations

from dstack.core.code import CodeSnapshot
from dstack.core.models import Job, JobSpec, JobStatus, Run, RunnerInfo, Tag
from dstack.core.resources import RunnerResources
from dstack.server.db.tables import JobRow, RunnerRow, RunRow, TagRow


def job_model(row: JobRow, with_spec: bool = True) -> Job:
    return Job(
        job_id=row.job_id,
        run_name=row.run_name,
        workflow=row.workflow,
        status=JobStatus(row.status),
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        runner=row.runner_name,
        exit_code=row.exit_code,
        reason=row.reason,
        spec=JobSpec.model_validate(row.spec) if with_spec else None,
        stop_requested=row.stop_requested,
        image_digest=row.image_digest,
        artifacts=row.saved_artifacts or [],
        ports=row.ports or [],
        runner_resources=row.runner_resources,
    )


def run_model(row: RunRow, with_specs: bool = True) -> Run:
    return Run(
        run_name=row.name,
        repo_id=row.repo_id,
        workflow=row.workflow,
        provider=row.provider,
        status=JobStatus(row.status),
        submitted_at=row.submitted_at,
        variables=row.variables or {},
        overrides=row.overrides or {},
        tags=sorted(t.name for t in row.tags),
        jobs=[job_model(j, with_specs) for j in row.jobs],
        code=CodeSnapshot.from_dict(row.code) if row.code else None,
        dependencies=row.dependencies or [],
        reproduces=row.reproduces,
        tag_when_done=row.tag_when_done,
    )


def tag_model(row: TagRow) -> Tag:
    return Tag(name=row.name, repo_id=row.repo_id, run_name=row.run_name, workflow=row.workflow,
               created_at=row.created_at)


def runner_model(row: RunnerRow, draining: bool = False) -> RunnerInfo:
    return RunnerInfo(
        name=row.name,
        hostname=row.hostname,
        backend=row.backend,
        status=row.status,
        resources=RunnerResources.model_validate(row.resources),
        registered_at=row.registered_at,
        last_seen_at=row.last_seen_at,
        job_id=row.job_id,
        labels=row.labels or {},
        version=row.version,
        draining=draining,
    )
