"""`dstack server` (foreground) and `dstack server stop`."""

from __future__ import annotations

import os
import sys

import click


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=3000, show_default=True,
              help="Port to bind (0: the port this DSTACK_HOME's server had last, else any free one).")
@click.option("--log-level", default="info", show_default=True)
@click.pass_context
def server(ctx: click.Context, host: str, port: int, log_level: str) -> None:
    """Run the dstack server in the foreground (state under DSTACK_HOME). Its URL and where its token is are
    printed; self-hosted runners join it with `dstack-runner start --server URL --token TOKEN`."""
    if ctx.invoked_subcommand:
        return
    from dstack.api.embedded import local_server

    running = local_server()
    if running:
        raise click.ClickException(f"a local server is already running at {running[0]}; "
                                   "stop it with `dstack server stop`")
    from dstack.core.home import dstack_home

    token_file = dstack_home() / "server" / "token"
    click.echo(f"Starting the dstack server (state in {dstack_home()}; token in {token_file})", err=True)
    cmd = [sys.executable, "-m", "dstack.server.main", "--host", host, "--port", str(port),
           "--log-level", log_level]
    sys.stderr.flush()
    os.execv(sys.executable, cmd)  # the server is this process: signals reach it directly


@server.command()
@click.option("--force", is_flag=True, help="Stop it even while jobs run (they are lost).")
def stop(force: bool) -> None:
    """Stop the local server started in the background (and its runners)."""
    from dstack.api.client import Client
    from dstack.api.embedded import local_server, stop_local_server, unfinished_runs

    running = local_server()
    if running and not force:
        busy = unfinished_runs(Client(*running))
        if busy:
            from dstack.core.sizes import plural

            raise click.ClickException(f"{plural(len(busy), 'run')} not finished: {', '.join(busy[:5])}; stopping the "
                                       "server now would lose them. Stop them first (`dstack stop RUN`), "
                                       "or use --force")
    click.echo("stopped" if stop_local_server() else "no local server is running")
