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

    result = connect().prune(repo_id(find_project()), dry_run)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    runs = result["runs"]
    click.echo(f"{verb} {len(runs)} run{'s' if len(runs) != 1 else ''}" + (f": {', '.join(runs)}" if runs else ""))
    click.echo(f"{verb} {_n(result['manifests'], 'artifact')}, {_n(result['blobs'], 'file blob')} and "
               f"{_n(result['code_blobs'], 'code snapshot')} nothing else uses ({_size(result['bytes'])})")


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
