"""`dstack logs RUN|JOB [-f]`."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_or_job")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new output until the run ends (Ctrl-C stops following, not the run).")
def logs(run_or_job: str, follow: bool) -> None:
    """Print the output of a run (all its jobs) or of one job. A run may be named by its tag, as
    `dependencies` do: `prepare:latest`."""
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id
    from dstack.cli.output import say_if_other_project

    client = connect()
    rid = repo_id(find_project())
    from dstack.cli.refs import run_name

    run = client.run(rid, run_name(client, rid, run_or_job))
    say_if_other_project(run, rid)
    jobs = [j for j in run["jobs"] if j["job_id"] == run_or_job] or run["jobs"]
    if follow:
        from dstack.cli.attach import follow_run

        sys.exit(follow_run(client, {**run, "jobs": jobs}, interrupt_asks=False))
    out = sys.stdout.buffer
    for job in jobs:
        offset, last = 0, b"\n"
        while chunk := client.logs(job["job_id"], offset).data:
            offset += len(chunk)
            out.write(chunk)
            last = chunk
        out.flush()
        if job["status"] in ("FAILED", "STOPPED", "ABORTED") and job.get("reason"):  # why, when it did not end well
            from dstack.core.names import printable

            own_line = "" if last.endswith(b"\n") else "\n"
            sys.stderr.write(f"{own_line}{run['run_name']} {job['status']}: {printable(job['reason'])}\n")
