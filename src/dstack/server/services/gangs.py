"""Multi-node runs (`nodes: N`): their N jobs are placed all at once or not at all, never half a run holding
machines while it waits. When a runner asks for a job and the oldest that fits is a multi-node run's master,
every job of the run is placed on the live runners that have room (the asking one first, which must get one):
each job gets its rank and the run's shape as variables, and the GPUs it holds; the jobs placed on other
runners wait, assigned but not yet delivered (`JobSpec.delivered`), for those runners' next `take`, which the
placement wakes. When one job fails, the others are stopped, saying which failed.

MASTER_JOB_PORT is a port that the master's runner found free when it asked for a job (its `take` says which;
the window until the master's job binds it is that of any port picked ahead); a runner before 0.5 does not say,
and the port is then chosen from the master's id (20000..29999). The master's job listens there."""

from __future__ import annotations

from sqlalchemy import select, update

from dstack.core.models import FINISHED, LIVE_RUNNERS, JobSpec, JobStatus, RunnerStatus
from dstack.core.resources import RunnerResources, Usage, place
from dstack.server.db.tables import JobRow, RunnerRow
from dstack.server.services import runner_tokens
from dstack.server.services.run_state import now, refresh_run_status


def master_port(master_job_id: str) -> int:
    return 20000 + int(master_job_id[:8], 16) % 10000


def address(runner: RunnerRow, res: RunnerResources) -> str:
    """Where other machines reach the runner: the address it reported, else its host name (a local runner:
    127.0.0.1)."""
    if runner.backend == "local":
        return "127.0.0.1"
    return res.address or runner.hostname


async def place_run(s, runner: RunnerRow, master, usage: dict[str, Usage], fits,
                    free_port: int | None = None) -> JobSpec | None:
    """Place every job of `master`'s run (all queued), on `runner` first: the job `runner` gets now, or None
    when the run does not fit now (nothing is changed then). `fits(spec, res, labels)`: what a runner lacks.
    `free_port`: a port that `runner` found free as it asked, MASTER_JOB_PORT when the master is placed there."""
    members = sorted((await s.execute(select(JobRow.job_id, JobRow.run_name, JobRow.spec).where(
        JobRow.run_name == master.run_name, JobRow.status == JobStatus.SUBMITTED.value,
        JobRow.runner_name.is_(None)))).all(), key=lambda r: r.spec.get("rank", 0))
    specs = [JobSpec.model_validate(r.spec) for r in members]
    if not members or len(members) != specs[0].nodes:
        return None  # some of them are not queued (stopped meanwhile): not placed at all
    draining = await runner_tokens.draining(s)
    others = (await s.scalars(select(RunnerRow).where(RunnerRow.status.in_(LIVE_RUNNERS), RunnerRow.name != runner.name)
                              .order_by(RunnerRow.name))).all()
    candidates = [runner] + [r for r in others if r.name not in draining]
    trial = {r.name: usage.get(r.name, Usage()).copy() for r in candidates}
    placed: list[tuple[RunnerRow, RunnerResources, list[int]]] = []
    for spec in specs:
        for r in candidates:
            res = RunnerResources.model_validate(r.resources)
            if fits(spec, res, r.labels):
                continue
            gpus = place(spec.requirements, res, trial[r.name])
            if gpus is not None:
                trial[r.name].add(spec.requirements, gpus)
                placed.append((r, res, gpus))
                break
        else:
            return None
    if not any(r.name == runner.name for r, _, _ in placed):
        return None  # the asking runner gets none of them: one of the others places the run
    port = free_port if free_port and placed[0][0].name == runner.name else master_port(members[0].job_id)
    master_address = address(placed[0][0], placed[0][1])
    given: JobSpec | None = None
    for row, spec, (r, res, gpus) in zip(members, specs, placed, strict=True):
        deliver_now = given is None and r.name == runner.name
        spec.gpu_indexes = gpus if res.gpus else None
        spec.delivered = deliver_now
        spec.env = {**spec.env, **{
            "JOB_RANK": str(spec.rank), "JOBS_COUNT": str(spec.nodes), "JOB_HOSTNAME": address(r, res),
            "MASTER_JOB_HOSTNAME": master_address, "MASTER_JOB_PORT": str(port),
            "MASTER_ADDR": master_address, "MASTER_PORT": str(port),
            "RANK": str(spec.rank), "NODE_RANK": str(spec.rank), "WORLD_SIZE": str(spec.nodes)}}
        taken = await s.execute(
            update(JobRow)
            .where(JobRow.job_id == row.job_id, JobRow.runner_name.is_(None),
                   JobRow.status == JobStatus.SUBMITTED.value)
            .values(runner_name=r.name, status=JobStatus.PROVISIONING.value, started_at=now(),
                    runner_resources=r.resources, spec=spec.model_dump(mode="json"), reason=None)
            .execution_options(synchronize_session=False))
        if taken.rowcount != 1:
            await s.rollback()
            return None
        r.status = RunnerStatus.BUSY.value
        r.job_id = row.job_id
        if deliver_now:
            given = spec
    await refresh_run_status(s, master.run_name)
    return given


async def deliver(s, runner_name: str) -> JobSpec | None:
    """A job placed on this runner with its run's others that it has not been given yet."""
    rows = (await s.scalars(select(JobRow).where(
        JobRow.runner_name == runner_name, JobRow.status == JobStatus.PROVISIONING.value))).all()
    for row in sorted(rows, key=lambda r: r.spec.get("rank", 0)):
        if row.spec.get("delivered", True) is False:
            row.spec = {**row.spec, "delivered": True}
            row.started_at = now()
            return JobSpec.model_validate(row.spec)
    return None


async def stop_the_others(s, failed: JobRow) -> list[str]:
    """A job of a multi-node run failed: the run's other jobs stop (artifacts saved), saying why. Returns them."""
    rank = (failed.spec or {}).get("rank", 0)
    why = f"stopped: job {failed.job_id} (rank {rank}) of this {failed.spec.get('nodes')}-node run failed"
    others = (await s.scalars(select(JobRow).where(
        JobRow.run_name == failed.run_name, JobRow.job_id != failed.job_id,
        JobRow.status.not_in([x.value for x in FINISHED])))).all()
    for job in others:
        if job.runner_name is None or job.spec.get("delivered", True) is False:
            job.status, job.finished_at, job.reason = JobStatus.STOPPED.value, now(), why
        else:
            job.stop_requested, job.reason = "stop", why
    await refresh_run_status(s, failed.run_name)
    return [j.job_id for j in others]

