"""Statuses of jobs and runs (plain enums: importing them costs nothing)."""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    SUBMITTED = "SUBMITTED"
    PROVISIONING = "PROVISIONING"
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    DONE = "DONE"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    ABORTED = "ABORTED"

    @property
    def finished(self) -> bool:
        return self in FINISHED

    @property
    def active(self) -> bool:
        return self in (JobStatus.PROVISIONING, JobStatus.RUNNING, JobStatus.UPLOADING)


FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.ABORTED})

# a run's status is the "worst" of its jobs' in this order
_RUN_ORDER = [
    JobStatus.FAILED,
    JobStatus.ABORTED,
    JobStatus.STOPPED,
    JobStatus.RUNNING,
    JobStatus.UPLOADING,
    JobStatus.PROVISIONING,
    JobStatus.SUBMITTED,
    JobStatus.DONE,
]


def run_status(job_statuses: list[JobStatus]) -> JobStatus:
    if not job_statuses:
        return JobStatus.SUBMITTED
    if any(not s.finished for s in job_statuses):
        active = [s for s in job_statuses if not s.finished]
        return min(active, key=_RUN_ORDER.index)
    return min(job_statuses, key=_RUN_ORDER.index)
