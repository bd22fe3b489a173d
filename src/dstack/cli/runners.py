"""`dstack runners`."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-a", "--all", "show_all", is_flag=True, help="Include runners that exited or were lost.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runners(show_all: bool, as_json: bool) -> None:
    """List the runners that execute jobs: on-demand (local backend) and self-hosted."""
    from dstack.api.embedded import connect

    found = connect().runners(include_gone=show_all)
    if as_json:
        import json

        click.echo(json.dumps([r.model_dump(mode="json") for r in found], indent=2, ensure_ascii=False))
        return
    if not found:
        click.echo("No runners. The local backend starts one when a job waits; "
                   "`dstack-runner start --server URL --token TOKEN` adds your own.")
        return
    from dstack.cli.output import ago
    from dstack.cli.table import print_table

    print_table(("RUNNER", "HOST", "BACKEND", "RESOURCES", "STATUS", "JOB", "UPDATED"),
                [(r.name, r.hostname, r.backend or "self-hosted", r.resources.describe(), r.status.value,
                  r.job_id or "", ago(r.last_seen_at)) for r in found])
