"""`dstack prune [--dry-run]`."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(dry_run: bool, as_json: bool) -> None:
    """Delete the finished runs of this project that are not tagged and that no tagged run depends on
    (directly or through other runs), with their logs; then delete the stored data nothing references."""
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id
    from dstack.core.sizes import human_size, plural

    result = connect().prune(repo_id(find_project()), dry_run)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    verb = "would delete" if dry_run else "deleted"
    runs = result["runs"]
    click.echo(f"{verb} {plural(len(runs), 'run')}" + (f": {', '.join(runs)}" if runs else ""))
    click.echo(f"{verb} {plural(result['manifests'], 'artifact')}, {plural(result['blobs'], 'file blob')} and "
               f"{plural(result['code_blobs'], 'code snapshot')} nothing else uses ({human_size(result['bytes'])})")
