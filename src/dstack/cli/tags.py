"""`dstack tag RUN TAG`, `dstack untag RUN|TAG`, `dstack tags`."""

from __future__ import annotations

import click

CTX = {"help_option_names": ["-h", "--help"]}


def _client_and_repo():
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id

    return connect(), repo_id(find_project())


@click.command(context_settings=CTX)
@click.argument("run")
@click.argument("tag")
def tag(run: str, tag: str) -> None:
    """Name the DONE run RUN as TAG; `WORKFLOW:TAG` then refers to it in dependencies. A tag of the same
    name on another run of the workflow moves to this one."""
    from dstack.cli.refs import run_name

    client, rid = _client_and_repo()
    t, moved_from = client.tag(rid, run_name(client, rid, run), tag)
    note = f" (moved from {moved_from})" if moved_from else ""
    click.echo(f"{t.workflow}:{t.name} -> {t.run_name}{note}")


@click.command(context_settings=CTX)
@click.argument("ref")
def untag(ref: str) -> None:
    """Remove the tag REF (TAG or WORKFLOW:TAG), or all tags of the run REF."""
    client, rid = _client_and_repo()
    for t in client.untag(rid, ref):
        click.echo(f"removed {t.workflow}:{t.name} (was {t.run_name})")


@click.command(context_settings=CTX)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tags(as_json: bool) -> None:
    """List the tags of this project."""
    client, rid = _client_and_repo()
    found = client.tags(rid)
    if as_json:
        import json

        click.echo(json.dumps([t.model_dump(mode="json") for t in found], indent=2, ensure_ascii=False))
        return
    from dstack.cli.output import ago
    from dstack.cli.table import print_table

    if not found:
        click.echo("No tags. Tag a DONE run with `dstack tag RUN TAG`.")
        return
    print_table(("TAG", "WORKFLOW", "RUN", "CREATED"),
                [(t.name, t.workflow, t.run_name, ago(t.created_at)) for t in found])
