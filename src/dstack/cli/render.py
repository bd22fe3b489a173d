"""Tables and details of runs."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING

from dstack.cli.output import STATUS_STYLE, ago, format_overrides, local_time
from dstack.cli.table import paint, print_table
from dstack.core.names import printable
from dstack.core.sizes import human_size, plural
from dstack.core.status import JobStatus

if TYPE_CHECKING:
    from dstack.core.models import Run

COLUMNS = ["RUN", "TAG", "JOB", "WORKFLOW", "VARIABLES", "SUBMITTED", "RUNNER", "STATUS"]


def _status(status: str, exit_code: int | None = None) -> str:
    if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.ABORTED) and exit_code not in (None, 0):
        return f"{status} (exit {exit_code})"
    return status


def _color(column: int, cell: str) -> str | None:
    return STATUS_STYLE.get(cell.split(" ")[0]) if column == len(COLUMNS) - 1 else None


def print_runs(runs: list[dict]) -> None:
    """Runs as the API gives them (JSON objects)."""
    if not runs:
        print("No runs yet. Start one with `dstack run WORKFLOW`.")
        return
    rows = []
    for run in runs:
        jobs = run["jobs"]
        runners = sorted({j["runner"] for j in jobs if j.get("runner")})
        variables = format_overrides(run.get("overrides") or {})
        rows.append([run["run_name"], ", ".join(run.get("tags") or []) or "<none>", "", run["workflow"], variables,
                     ago(datetime.fromisoformat(run["submitted_at"])), ", ".join(runners), _status(run["status"])])
        for job in jobs:
            rows.append(["", "", job["job_id"], job["workflow"], variables, ago(datetime.fromisoformat(job["submitted_at"])),
                         job.get("runner") or "", _status(job["status"], job.get("exit_code"))])
    print_table(COLUMNS, rows, _color)


def print_run_detail(run: Run) -> None:
    print_runs([run.model_dump(mode="json")])
    tty = sys.stdout.isatty()

    def line(label: str, value: str, indent: str = "") -> None:
        print(f"{indent}{paint(label.ljust(13 - len(indent)), 'bold', tty)}{printable(value)}")

    print()
    line("Workflow", f"{run.workflow} ({run.provider})")
    if run.variables:
        line("Variables", ", ".join(f"{k}={v!r}" for k, v in run.variables.items()))
    code = run.code
    if code is not None:
        where = f"{code.repo_url or 'local repo'} {code.branch or ''}@{code.commit[:12]}" if code.commit else "folder"
        how = ("cloned, diff applied" if code.diff_hash else "cloned") if code.mode == "git" else "archived"
        line("Code", f"{where}{' with uncommitted changes' if code.dirty else ''} ({how}; {plural(code.files, 'file')}, "
                     f"tree {code.tree_hash[:12]})")
    if run.reproduces:
        line("Reproduces", run.reproduces)
    for d in run.dependencies:
        line("Input", f"{d.ref} -> {d.run_name} ({d.job_id}): {', '.join(d.artifacts)}")
    if run.used_by:
        line("Used by", ", ".join(run.used_by))
    for job in run.jobs:
        print(paint(f"Job {job.job_id}", "bold", tty))
        spec = job.spec
        if spec and spec.image:
            line("image", f"{spec.image}{' @ ' + job.image_digest if job.image_digest else ''}", "  ")
        if spec:
            line("resources", spec.requirements.describe(), "  ")
        if job.runner:
            res = f" ({job.runner_resources.describe()})" if job.runner_resources else ""
            line("runner", f"{job.runner}{res}", "  ")
        if job.started_at:
            line("started", local_time(job.started_at), "  ")
        if job.finished_at:
            line("finished", local_time(job.finished_at), "  ")
        if job.exit_code is not None:
            line("exit code", str(job.exit_code), "  ")
        if job.cost is not None:
            line("cost", f"${job.cost:.4f}" + ("" if job.finished_at else " so far"), "  ")
        if job.reason:
            line("reason", job.reason, "  ")
        for a in job.artifacts:
            line("artifact", f"{a['path']} ({plural(a['files'], 'file')}, {human_size(a['size'])})", "  ")
