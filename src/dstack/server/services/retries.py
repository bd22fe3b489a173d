"""`retry:` of a workflow: a job whose runner was lost (or, when the workflow says so, that failed) goes back to
the queue, as the same job, instead of failing, until its limit is spent. Its log goes on: a line of dstack's
says why it starts again, and the next attempt's output follows (`log_base`: where it starts, so that the
runner's offsets, which start at 0 for each attempt, still keep a batch sent twice from being appended
twice)."""

from __future__ import annotations

from dstack.core.models import JobStatus
from dstack.server.context import Context
from dstack.server.db.tables import JobRow
from dstack.server.services.jobs import append_logs, log_path

RUNNER_LOST, ERROR, INTERRUPTED = "runner-lost", "error", "interrupted"


def requeue(ctx: Context, job: JobRow, cause: str, why: str) -> bool:
    """Put `job` (a row of an open session, not yet finished) back in the queue when its workflow's `retry`
    covers `cause` and has attempts left; whether it did. The caller commits."""
    spec = job.spec or {}
    policy, attempt = spec.get("retry"), int(spec.get("attempt") or 1)
    causes = policy.get("on", [RUNNER_LOST]) if policy else []
    if cause == INTERRUPTED and RUNNER_LOST in causes:  # a spot machine taken back is a runner lost, told early
        causes = [*causes, INTERRUPTED]
    if not policy or cause not in causes or attempt > int(policy.get("limit", 1)):
        return False
    if job.stop_requested:
        return False  # the user stopped it: that is not a failure to retry
    if int(spec.get("nodes") or 1) > 1:
        return False  # a multi-node run's jobs start together or not at all
    total = int(policy.get("limit", 1)) + 1
    path = log_path(ctx, job.job_id)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 1))
            own_line = f.read(1) not in (b"", b"\n")
    except FileNotFoundError:
        size, own_line = 0, False
    note = f"{chr(10) if own_line else ''}[dstack: {why}; the job starts again (attempt {attempt + 1} of {total})]\n"
    append_logs(ctx, job.job_id, note.encode(), notify=False)
    job.spec = {**spec, "attempt": attempt + 1, "log_base": size + len(note.encode())}
    job.status, job.runner_name, job.started_at, job.finished_at = JobStatus.SUBMITTED.value, None, None, None
    job.exit_code, job.image_digest, job.ports, job.saved_artifacts = None, None, [], []
    job.runner_resources, job.reason = None, f"{why}; started again (attempt {attempt + 1} of {total})"
    return True
