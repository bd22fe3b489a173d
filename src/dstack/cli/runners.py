"""`dstack runners [add|remove]`: the machines that execute jobs, and their identities."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-a", "--all", "show_all", is_flag=True, help="Include runners that exited or were lost.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def runners(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List the runners that execute jobs: on-demand (the local backend's) and self-hosted.

    \b
    dstack runners add [--name N] [--labels k=v]...   a token for a self-hosted runner
    dstack runners remove NAME [--force]              drain a runner and revoke its token
    """
    if ctx.invoked_subcommand is not None:
        return
    from dstack.api.embedded import connect

    found = connect().runners(include_gone=show_all)
    if as_json:
        import json

        click.echo(json.dumps([r.model_dump(mode="json") for r in found], indent=2, ensure_ascii=False))
        return
    if not found:
        click.echo("No runners. The local backend starts one when a job waits; `dstack runners add` makes a "
                   "token for a runner of your own.")
        return
    from dstack.cli.output import ago
    from dstack.cli.table import print_table

    def status(r) -> str:
        return f"{r.status.value} (draining)" if r.draining else r.status.value

    def labels(r) -> str:
        return ",".join(f"{k}={v}" for k, v in r.labels.items())

    def free(r) -> str:
        return r.free.describe().removesuffix(", docker") if r.free is not None and r.jobs else "all"

    def price(r) -> str:
        return f"${r.price:.2f}/h" if r.price else ""

    print_table(("RUNNER", "HOST", "BACKEND", "RESOURCES", "FREE", "LABELS", "STATUS", "JOBS", "PRICE", "VERSION",
                 "HEARTBEAT"),
                [(r.name, r.hostname, r.backend or "self-hosted", r.resources.describe(), free(r), labels(r),
                  status(r), ", ".join(r.jobs), price(r), r.version or "", ago(r.last_seen_at)) for r in found])


@runners.command()
@click.option("--name", default=None, help="The runner's name (default: generated).")
@click.option("--labels", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label that workflows may ask for (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print {name, token, labels} as JSON.")
def add(name: str | None, labels: tuple[str, ...], as_json: bool) -> None:
    """Make a token for a self-hosted runner (shown once: the server keeps only its hash).

    The token lets a runner take jobs, report them and read their code and dependencies, and nothing else.
    """
    from dstack.api.embedded import connect
    from dstack.core.names import parse_labels

    try:
        pairs = parse_labels(labels)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    client = connect()
    issued = client.add_runner(name, pairs)
    if as_json:
        import json

        click.echo(json.dumps(issued, indent=2, ensure_ascii=False))
        return
    click.echo(f"Runner {issued['name']}: its token is shown this once; keep it secret.\n\n"
               f"  {issued['token']}\n\n"
               f"On the machine that should run jobs (with dstack installed):\n\n"
               f"  dstack-runner start --server {client.url} --token {issued['token']}")
    if "//127." in client.url or "//localhost" in client.url:
        click.echo("\nThis server listens on this machine only; for a runner on another machine, run the server "
                   "where it can be reached: `dstack server --host 0.0.0.0` (or the address of an interface).",
                   err=True)


@runners.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop its running job now (artifacts saved) instead of waiting for it.")
def remove(name: str, force: bool) -> None:
    """Drain runner NAME: it takes no new job and leaves once its job has ended; its token then works no more."""
    from dstack.api.embedded import connect

    found = connect().remove_runner(name, force=force)
    if not found:
        click.echo(f"Removed {name}.")
    elif found.get("jobs"):  # its unfinished jobs (`job_id` is the last it took, maybe long done)
        jobs = found["jobs"]
        named = f"job {jobs[0]}" if len(jobs) == 1 else f"jobs {', '.join(jobs)}"
        click.echo(f"Draining {name}: " + (f"{'its job is' if len(jobs) == 1 else 'its jobs are'} being stopped"
                                           if force else f"it leaves once {named} {'has' if len(jobs) == 1 else 'have'}"
                                           f" ended (--force stops {'it' if len(jobs) == 1 else 'them'})"))
    else:
        click.echo(f"Draining {name}: it leaves at its next heartbeat (within 10 s).")
