"""`dstack run WORKFLOW [--VAR VALUE]... [-d]`."""

from __future__ import annotations

import sys

import click

from dstack.core.errors import ConfigError, DstackError, NotFound


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": ["-h", "--help"]})
@click.argument("workflow", required=False)
@click.option("-d", "--detach", is_flag=True, help="Submit and return; don't stream logs.")
@click.option("--reproduce", "reproduce", metavar="RUN", default=None,
              help="Re-run RUN exactly: its code, variables, image digest and dependency artifacts.")
@click.option("-t", "--tag", default=None, help="Tag the run as TAG once it is DONE (moves an existing tag).")
@click.option("--json", "as_json", is_flag=True, help="Print the submitted run as JSON (implies --detach).")
@click.pass_context
def run(ctx: click.Context, workflow: str | None, detach: bool, reproduce: str | None, tag: str | None,
        as_json: bool) -> None:
    """Run WORKFLOW of .dstack/workflows.yaml.

    Variables of .dstack/variables.yaml are overridden as --NAME VALUE (e.g. `dstack run prepare --gpu 4`).
    Attached by default: logs are streamed and the exit code is the job's. Ctrl-C asks whether to
    stop the run (the default), abort it (no artifacts saved), detach from it, or continue; Ctrl-C at
    that prompt stops it, and once more while it stops aborts it.
    """
    from dstack.api.code_capture import capture
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id
    from dstack.config.variables import parse_cli_args
    from dstack.config.workflows import resolve_workflow
    from dstack.core.models import RunSubmission

    project = find_project()
    if reproduce:
        if workflow or ctx.args:
            raise click.UsageError("--reproduce RUN takes no workflow and no variables: it re-runs RUN as it was")
        client = connect()
        submitted = client.reproduce(repo_id(project), reproduce)
        return _attach(client, submitted, f"reproduces {reproduce}", detach, as_json)
    if not workflow:
        from dstack.config.workflows import load_workflows

        entries = load_workflows(project)
        listing = "\n".join(f"  {e.name:<20} {e.raw.get('help') or ''}".rstrip() for e in entries)
        raise click.UsageError(f"which workflow? `dstack run WORKFLOW`; the workflows of {project}:\n{listing}")
    overrides = parse_cli_args(ctx.args)
    resolve_workflow(project, workflow, overrides, "run-name")  # bad input fails before any server starts
    client = connect()
    run_name = client.reserve_name()
    resolved = resolve_workflow(project, workflow, overrides, run_name)
    code, blobs = capture(project)
    total = sum(len(b) for b in blobs.values())
    if total > 20 * 1024 * 1024:
        click.echo(f"Uploading the code: {total / 1024 / 1024:.0f} MB ({code.files} files). Large data belongs in "
                   "artifacts; list it in .dstackignore (or .gitignore) to leave it out.", err=True)
    for digest, data in blobs.items():
        client.upload_code(digest, data)
    sub = RunSubmission(run_name=run_name, repo_id=repo_id(project), workflow=workflow, provider=resolved.provider,
                        variables=resolved.variables, overrides=overrides, dependencies=resolved.dependencies,
                        jobs=resolved.jobs, code=code, tag=tag)
    try:
        submitted = client.submit(sub)
    except (NotFound, DstackError) as e:
        raise _located(e, resolved.dependency_errors) from None
    _attach(client, submitted, workflow, detach, as_json)


def _attach(client, submitted, what: str, detach: bool, as_json: bool) -> None:
    if as_json:
        click.echo(submitted.model_dump_json(indent=2))
        return
    err = click.get_text_stream("stderr")
    err.write(f"Run {submitted.run_name} ({what}) submitted\n")
    if detach:
        err.write(f"Follow it with `dstack logs {submitted.run_name} -f`\n")
        return
    from dstack.cli.attach import follow_run

    sys.exit(follow_run(client, submitted))


def _located(e: DstackError, where: dict[str, ConfigError]) -> DstackError:
    """A dependency the server could not resolve, pointed at where the workflow names it."""
    for ref, loc in where.items():
        if f"'{ref}'" in e.message:
            return ConfigError(e.message, hint=e.hint, file=loc.file, line=loc.line, column=loc.column)
    return e
