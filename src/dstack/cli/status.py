"""`dstack status [RUN] [-n N] [--all] [--json]`."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", required=False)
@click.option("-n", "--last", "limit", type=click.IntRange(min=1), default=None, help="Show the last N runs (default 10).")
@click.option("-a", "--all", "show_all", is_flag=True, help="Show all runs of this project (default: the last 10).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def status(run: str | None, limit: int | None, show_all: bool, as_json: bool) -> None:
    """Show runs of this project and their jobs (newest first), or one RUN in detail (RUN may be a
    tagged run, `prepare:latest`)."""
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id

    client = connect()
    project = find_project()
    rid = repo_id(project)
    if run:
        from dstack.cli.refs import run_name

        found = client.run(rid, run_name(client, rid, run))
        from dstack.cli.output import say_if_other_project

        say_if_other_project(found, rid)
        if as_json:
            import json

            click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        else:
            from dstack.cli.render import print_run_detail
            from dstack.core.models import Run

            print_run_detail(Run.model_validate(found))
        return
    shown = None if show_all else (limit or 10)
    runs, total = client.runs_and_total(rid, limit=shown)
    if as_json:
        import json

        click.echo(json.dumps(runs, indent=2, ensure_ascii=False))
        return
    from dstack.cli.render import print_runs

    if not (project / ".dstack").is_dir():  # which runs these are is not obvious: say it
        click.echo(f"No .dstack/ folder here or above: the runs of {rid}", err=True)
    print_runs(runs)
    if total is not None and total > len(runs):
        more = total - len(runs)
        if more <= len(runs):  # -n twice as many shows them all
            click.echo(f"{more} more: `dstack status -n {total}` or `dstack status -a` shows all {total}", err=True)
        else:  # say what the larger -n shows: not all of them
            click.echo(f"{more} more: `dstack status -n {len(runs) * 2}` shows {len(runs)} of them, `dstack status "
                       f"-a` all {total}", err=True)
