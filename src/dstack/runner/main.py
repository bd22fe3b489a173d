"""`dstack-runner`: the daemon that executes jobs on a machine.

    dstack-runner start --server URL --token TOKEN     # self-hosted: serve jobs until stopped
    dstack-runner check                                # what this machine offers
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from dstack.core.home import dstack_home, job_umask, private_home


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run dstack jobs on this machine."""


@cli.command()
def check() -> None:
    """Print the resources this machine offers to jobs (CPU, memory, GPUs, Docker)."""
    from dstack.runner.resources import detect_resources

    click.echo(json.dumps(detect_resources().model_dump(), indent=2))


@cli.command()
@click.option("--server", "server_url", envvar="DSTACK_SERVER_URL", required=True, help="URL of the dstack server.")
@click.option("--token", envvar="DSTACK_TOKEN", required=True, help="Server token (or env DSTACK_TOKEN).")
@click.option("--name", default=None, help="Runner name (default: generated).")
@click.option("--backend", default=None, hidden=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where job folders live (default: DSTACK_HOME/runner).")
@click.option("--idle-timeout", type=float, default=None, help="Exit after this many seconds without a job.")
@click.option("--server-lost-timeout", type=float, default=None,
              help="Exit after the server has been unreachable this many seconds while no job runs (default: "
                   "wait for it forever; 60 with --idle-timeout). A job's reports wait for the server anyway.")
@click.option("--no-docker", is_flag=True, help="Run host jobs only, even if Docker is available.")
def start(server_url: str, token: str, name: str | None, backend: str | None, workdir: Path | None,
          idle_timeout: float | None, server_lost_timeout: float | None, no_docker: bool) -> None:
    """Register with a server and execute the jobs it hands out."""
    from dstack.runner.client import ServerClient
    from dstack.runner.daemon import Runner
    from dstack.runner.resources import detect_resources

    os.umask(job_umask())  # a job's files as the user's (a local runner inherits the server's private umask)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    resources = detect_resources()
    if no_docker:
        resources.docker = False
    if server_lost_timeout is None and idle_timeout is not None:
        server_lost_timeout = 60.0  # an on-demand runner does not wait forever for a server that is gone
    runner = Runner(ServerClient(server_url, token), resources, workdir or dstack_home() / "runner", name=name,
                    backend=backend, idle_timeout=idle_timeout, server_lost_timeout=server_lost_timeout)

    def _term(signum, _frame):
        logging.getLogger("dstack.runner").info("signal %s: stopping the current job (if any) and exiting", signum)
        if runner.shutdown():
            raise SystemExit(0)  # idle: interrupt the long poll at once

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    if workdir is None:
        private_home()
    os.makedirs(runner.workdir, mode=0o700, exist_ok=True)
    import httpx

    from dstack.core.errors import DstackError
    from dstack.runner.client import ServerTrouble

    try:
        runner.serve()
    except (httpx.TransportError, ServerTrouble) as e:  # before DstackError: ServerTrouble is one
        raise click.ClickException(f"cannot reach the server at {server_url}: {e}") from None
    except DstackError as e:
        raise click.ClickException(f"{e.message}" + (f" ({e.hint})" if e.hint else "")) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
