"""`dstack validate [PATH]`: every workflow of a project checked as `dstack run` would, with no server and running
nothing; every mistake at its file:line:column. Also a pre-commit hook (.pre-commit-hooks.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print errors only (no warnings, no summary).")
def validate(path: Path | None, quiet: bool) -> None:
    """Check every workflow of the project at PATH (default: the one around the current folder): the files'
    structure, each provider's keys, variable references and dependency syntax. Prints `N workflows OK`, or every
    mistake found and exits 2. A variable that no variables.yaml declares is a warning (the command line may
    give it)."""
    from dstack.api.repo import find_project
    from dstack.cli.output import print_error
    from dstack.config.files import ProjectFiles
    from dstack.config.workflows import validate_project

    if path is not None and not path.is_dir():
        raise click.BadParameter(f"{path} is not a folder", param_hint="PATH")
    root = find_project(path)
    files = ProjectFiles.read(root)
    if not files.workflow_files():
        click.echo(f"error: {root} has no .dstack/workflows.yaml (nor .dstack/workflows/*.yaml)", err=True)
        sys.exit(2)
    found = validate_project(files)
    for e in found.errors:
        print_error(e)
    if not quiet:
        for w in found.warnings:
            click.echo(w, err=True)
    if found.errors:
        bad = len(found.failed)
        where = f" in {bad} of {found.workflows} workflows" if bad else ""
        click.echo(f"{len(found.errors)} error{'s' if len(found.errors) != 1 else ''}{where}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(f"{found.workflows} workflow{'s' if found.workflows != 1 else ''} OK")
