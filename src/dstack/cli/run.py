"""`dstack run WORKFLOW [--VAR VALUE]... [-d]`."""

from __future__ import annotations

import sys
import threading

import click

from dstack.core.errors import ConfigError, DstackError, MissingCode
from dstack.core.names import printable


# `--help` is an option of ours, not click's: after a workflow's name it shows that workflow's help and variables
@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("workflow", required=False)
@click.option("-d", "--detach", is_flag=True, help="Submit and return; don't stream logs.")
@click.option("--reproduce", "reproduce", metavar="RUN", default=None,
              help="Re-run RUN exactly: its code, variables, image digest and dependency artifacts.")
@click.option("-t", "--tag", default=None, help="Tag the run as TAG once it is DONE (moves an existing tag).")
@click.option("--json", "as_json", is_flag=True, help="Print the submitted run as JSON (implies --detach).")
@click.option("-h", "--help", "show_help", is_flag=True,
              help="Show this message; after WORKFLOW, its help, its variables and how to set them.")
@click.pass_context
def run(ctx: click.Context, workflow: str | None, detach: bool, reproduce: str | None, tag: str | None,
        as_json: bool, show_help: bool) -> None:
    """Run WORKFLOW of .dstack/workflows.yaml.

    Variables of .dstack/variables.yaml are overridden as --NAME VALUE (e.g. `dstack run prepare --gpu 4`);
    `dstack run WORKFLOW --help` lists them. A variable named like an option below (tag, json, detach, help,
    reproduce) goes after `--`: `dstack run train -- --tag v2`. `dstack docs` shows the full syntax of the files.

    Attached by default: logs are streamed and the exit code is the job's. Ctrl-C asks whether to
    stop the run (the default), abort it (no artifacts saved), detach from it, or continue; Ctrl-C at
    that prompt stops it, and once more while it stops aborts it.
    """
    if show_help:  # from the files alone: no server
        from dstack.cli.run_help import print_help

        return print_help(ctx, workflow)
    from dstack.api.code_capture import capture
    from dstack.api.embedded import connect
    from dstack.api.repo import find_project, repo_id
    from dstack.config.files import ProjectFiles

    project = find_project()
    if reproduce:
        if workflow or ctx.args:
            raise click.UsageError("--reproduce RUN takes no workflow and no variables: it re-runs RUN as it was")
        from dstack.cli.refs import run_name

        client, rid = connect(), repo_id(project)
        name = run_name(client, rid, reproduce)
        submitted, interrupted = _deferring_interrupts(lambda: client.reproduce(rid, name))
        what = reproduce if name == reproduce else f"{reproduce} ({name})"
        if not as_json and submitted.get("repo_id") and submitted["repo_id"] != rid:  # as status and logs say it
            click.echo(f"note: {name} is a run of another project ({printable(submitted['repo_id'])}), not of this one "
                       f"({printable(rid)}); so is {submitted['run_name']}, which reproduces it", err=True)
        return _attach(client, submitted, f"reproduces {what}", detach, as_json, interrupted)
    files = ProjectFiles.read(project)
    if not _a_provider(workflow, files):  # `dstack run python train.py` needs no workflows file
        files.require_workflows()  # before any server starts
    if not workflow:
        from dstack.config.workflows import load_workflows

        entries = load_workflows(files)
        if not entries:
            raise ConfigError("the file defines no workflow", file=".dstack/workflows.yaml",
                              hint="add one: `workflows:` then `  - name: hello` and `    commands: [echo hello]` "
                                   "(`dstack init` writes an example; `dstack docs` has the syntax)")
        listing = "\n".join(f"  {e.name:<20} {e.raw.get('help') or ''}".rstrip() for e in entries)
        raise click.UsageError(f"which workflow? `dstack run WORKFLOW`; the workflows of {project}:\n{listing}")
    client = connect()
    # while git is asked for the code: git for the repo's identity, and the server for the project's artifact
    # folders (outputs, never code: capture leaves out what git does not track there)
    identity = _meanwhile(lambda: repo_id(project))
    outputs = _meanwhile(lambda: client.artifact_folders(files.texts, workflow)) \
        if any("artifacts" in text for text in files.texts.values()) else (lambda: {})
    tracked: dict[str, int] = {}
    code, blobs = capture(project, lambda: outputs().get("folders", []), tracked.__setitem__)
    for folder in outputs().get("saved", []):
        if folder in tracked:
            from dstack.core.sizes import plural

            click.echo(f"warning: git tracks {plural(tracked[folder], 'file')} in {printable(folder)}/, an artifact "
                       f"folder of '{printable(workflow)}': tracked files are code, so they travel with the run "
                       "and are saved in its artifact with what the job writes", err=True)
    # the server resolves the workflow (variables, provider, jobs) and points at the files where it is wrong;
    # it asks for the code's blobs it lacks only once the run is otherwise sound
    request = {"repo_id": identity(), "workflow": workflow, "args": ctx.args, "files": files.texts,
               "project": str(project), "code": code.to_dict(), "tag": tag}
    try:
        submitted, interrupted = _deferring_interrupts(lambda: client.submit(request))
    except MissingCode as e:
        missing = {h: blobs[h] for h in e.blobs if h in blobs}
        if len(missing) < len(e.blobs):
            raise DstackError("the server asks for code this run did not capture", hint="run it again") from None
        total = sum(len(b) for b in missing.values())
        if total > 20 * 1024 * 1024:
            from dstack.core.sizes import human_size, plural

            click.echo(f"Uploading the code: {human_size(total)} ({plural(code.files, 'file')}). Large data belongs "
                       "in artifacts; list it in .dstackignore (or .gitignore) to leave it out.", err=True)
        try:
            for digest, data in missing.items():
                client.upload_code(digest, data)
        except KeyboardInterrupt:
            click.echo("Interrupted while uploading the code; nothing was submitted.", err=True)
            sys.exit(130)
        submitted, interrupted = _deferring_interrupts(lambda: client.submit(request))
    _attach(client, submitted, workflow, detach, as_json, interrupted)


def _a_provider(name: str | None, files) -> bool:
    """`dstack run PROVIDER ARGS` (2022): a provider's name, and no workflows file that could name a workflow so."""
    if not name or files.workflow_files():
        return False
    from importlib.metadata import entry_points

    return any(ep.name == name for ep in entry_points(group="dstack.providers"))


def _where(run: dict) -> str:
    """`: on the host of a runner` or `: in image X`: where its jobs run is never a surprise."""
    images = {(job.get("spec") or {}).get("image") or None for job in run.get("jobs") or []}  # `image: ""`: none
    if images == {None}:
        return "; it runs on the host of a runner (the workflow has no `image`)"
    return f"; it runs in image {printable(', '.join(sorted(i for i in images if i)))}" if images else ""


def _meanwhile(work):
    """Starts `work()` in a thread; returns a function that waits for its result (or raises its error)."""
    done: list = []

    def run() -> None:
        try:
            done.append((work(), None))
        except Exception as e:  # raised by the caller, in the main thread
            done.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join()
        value, error = done[0]
        if error is not None:
            raise error
        return value

    return result


def _deferring_interrupts(submit):
    """`submit()`, with Ctrl-C held back until the server has answered: once a run is submitted, the caller
    must know its name to stop it. Returns (its result, whether Ctrl-C was pressed meanwhile)."""
    import signal

    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        return submit(), bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _attach(client, submitted: dict, what: str, detach: bool, as_json: bool, interrupted: bool = False) -> None:
    """Print or follow the submitted run. `interrupted`: Ctrl-C came while it was submitted, which stops it
    (attached: as Ctrl-C does while following, so in a terminal it asks first)."""
    name = submitted["run_name"]
    if as_json:
        import json

        click.echo(json.dumps(submitted, indent=2, ensure_ascii=False))
    else:
        for warning in submitted.get("warnings") or []:
            click.echo(printable(warning), err=True)
        click.echo(f"Run {name} ({what}) submitted{_where(submitted)}", err=True)
    if interrupted and (detach or as_json):
        client.stop(None, name)
        click.echo(f"Interrupted: stopping {name} (`dstack status {name}` shows it)", err=True)
        sys.exit(130)
    if as_json:
        return
    if detach:
        click.echo(f"Follow it with `dstack logs {name} -f`", err=True)
        return
    from dstack.cli.attach import follow_run

    sys.exit(follow_run(client, submitted, interrupted=interrupted))
