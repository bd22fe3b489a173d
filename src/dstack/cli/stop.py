"""`dstack stop RUN|JOB [--abort]`."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_or_job")
@click.option("-x", "--abort", is_flag=True, help="Kill at once and don't save artifacts.")
@click.option("--no-wait", is_flag=True, help="Return without waiting for the jobs to end.")
def stop(run_or_job: str, abort: bool, no_wait: bool) -> None:
    """Stop a run or one of its jobs: SIGTERM, then SIGKILL after a grace period; artifacts are saved
    unless --abort."""
    import time

    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id
    from dstack.core.processes import stop_grace
    from dstack.core.status import JobStatus

    client = connect()
    rid = repo_id(find_project())
    from dstack.cli.refs import run_name

    run = client.stop(rid, run_name(client, rid, run_or_job), abort=abort)
    from dstack.cli.output import say_if_other_project

    say_if_other_project(run, rid)
    if run["status"] in (JobStatus.DONE, JobStatus.FAILED):  # it ended on its own: stopping changed nothing
        click.echo(f"{run['run_name']} had already ended: {run['status']}; nothing to stop")
        return
    # the runner sends SIGTERM, then SIGKILL after its grace: by then (and a report) the job has ended, or
    # something is wrong that waiting longer would not mend
    grace = 0.0 if abort else stop_grace()
    if not no_wait and not JobStatus(run["status"]).finished:
        click.echo(f"Waiting for {run['run_name']} to exit" + (f" (SIGTERM sent; SIGKILL in {grace:g}s)" if grace
                                                               else " (SIGKILL sent)"), err=True)
    deadline = time.monotonic() + grace + 5
    while not no_wait and not JobStatus(run["status"]).finished and time.monotonic() < deadline:
        time.sleep(0.2)
        run = client.run(rid, run["run_name"])
    finished = JobStatus(run["status"]).finished
    click.echo(f"{run['run_name']} {run['status'] if finished else ('aborting' if abort else 'stopping')}")
    if not finished and not no_wait:
        from dstack.core.names import printable

        reasons = sorted({printable(j["reason"]) for j in run["jobs"]
                          if j.get("reason") and not JobStatus(j["status"]).finished})
        click.echo(f"It has not ended yet{': ' + '; '.join(reasons) if reasons else ''}. `dstack status "
                   f"{run['run_name']}` says when it has.", err=True)
