"""Tables and details of runs."""

from __future__ import annotations

from dstack.cli.output import STATUS_STYLE, ago, console, format_overrides
from dstack.core.models import Job, JobStatus, Run

COLUMNS = ["RUN", "TAG", "JOB", "WORKFLOW", "VARIABLES", "SUBMITTED", "RUNNER", "STATUS"]


def _status(status: JobStatus, job: Job | None = None) -> str:
    text = status.value
    if job is not None and status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.ABORTED):
        if job.exit_code not in (None, 0):
            text += f" (exit {job.exit_code})"
    return f"[{STATUS_STYLE.get(status.value, '')}]{text}[/]"


def print_runs(runs: list[Run]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for c in COLUMNS:
        table.add_column(c, no_wrap=c != "VARIABLES")
    for run in runs:
        runners = sorted({j.runner for j in run.jobs if j.runner})
        variables = format_overrides(run.overrides)
        table.add_row(run.run_name, ", ".join(run.tags) or "<none>", "", run.workflow, variables,
                      ago(run.submitted_at), ", ".join(runners), _status(run.status))
        for job in run.jobs:
            table.add_row("", "", job.job_id, job.workflow, variables, ago(job.submitted_at), job.runner or "",
                          _status(job.status, job))
    c = console()
    if not runs:
        c.print("No runs yet. Start one with `dstack run WORKFLOW`.")
        return
    c.print(table)


def print_run_detail(run: Run) -> None:
    c = console()
    print_runs([run])
    c.print()
    c.print(f"[bold]Workflow[/]     {run.workflow} ({run.provider})")
    if run.variables:
        c.print(f"[bold]Variables[/]    {', '.join(f'{k}={v!r}' for k, v in run.variables.items())}")
    code = run.code
    if code.commit:
        c.print(f"[bold]Code[/]         {code.repo_url or 'local repo'} {code.branch}@{code.commit[:12]}"
                f"{' (with uncommitted changes)' if code.dirty else ''}")
    elif code.archive_hash:
        c.print(f"[bold]Code[/]         folder archive {code.archive_hash[:12]}")
    if run.reproduces:
        c.print(f"[bold]Reproduces[/]   {run.reproduces}")
    for d in run.dependencies:
        c.print(f"[bold]Input[/]        {d.ref} -> {d.run_name} ({d.job_id}): {', '.join(d.artifacts)}")
    if run.used_by:
        c.print(f"[bold]Used by[/]      {', '.join(run.used_by)}")
    for job in run.jobs:
        c.print(f"[bold]Job {job.job_id}[/]")
        spec = job.spec
        if spec.image:
            c.print(f"  image        {spec.image}{' @ ' + job.image_digest if job.image_digest else ''}")
        c.print(f"  resources    {spec.requirements.describe()}")
        if job.runner:
            res = f" ({job.runner_resources.describe()})" if job.runner_resources else ""
            c.print(f"  runner       {job.runner}{res}")
        if job.started_at:
            c.print(f"  started      {job.started_at:%Y-%m-%d %H:%M:%S} UTC")
        if job.finished_at:
            c.print(f"  finished     {job.finished_at:%Y-%m-%d %H:%M:%S} UTC")
        if job.exit_code is not None:
            c.print(f"  exit code    {job.exit_code}")
        if job.reason:
            c.print(f"  reason       {job.reason}")
        for a in job.artifacts:
            c.print(f"  artifact     {a['path']} ({a['files']} files, {a['size']} bytes)")
