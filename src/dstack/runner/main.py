"""`dstack-runner`: the daemon that executes jobs on a machine.

    dstack-runner start --server URL --token TOKEN     # self-hosted: serve jobs until stopped
    dstack-runner check                                # what this machine offers
    dstack-runner install --server URL --token TOKEN   # a systemd unit that starts it at every boot
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
from dstack.runner.systemd import TOKENS, UNIT


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
@click.option("--token", envvar="DSTACK_TOKEN", default=None,
              help="This runner's token, from `dstack runners add` (or env DSTACK_TOKEN).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read the token from this file, and remove it once read.")
@click.option("--token-fd", type=int, default=None, hidden=True)  # the token, from the process before exec
@click.option("--name", default=None, help="Runner name (default: its token's, or generated).")
@click.option("--labels", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label that workflows may ask for (repeatable); added to those of its token.")
@click.option("--backend", default=None, hidden=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where job folders live (default: DSTACK_HOME/runner).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Exit after this many seconds without a job.")
@click.option("--server-lost-timeout", type=click.FloatRange(min=0), default=None,
              help="Exit after the server has been unreachable this many seconds while no job runs (default: "
                   "wait for it forever; 60 with --idle-timeout). A job's reports wait for the server anyway.")
@click.option("--no-docker", is_flag=True, help="Run host jobs only, even if Docker is available.")
@click.option("--interruptible", is_flag=True,
              help="This is a spot machine: only jobs that say `interruptible: true` run here, and the provider's "
                   "interruption notice (EC2's instance metadata) is read while they run.")
@click.option("--job-user", envvar="DSTACK_JOB_USER", default=None, metavar="USER",
              help="A runner that runs as root runs each host job as a user of its own (a uid from "
                   "DSTACK_JOB_UIDS, named dstack-job), so that a job cannot read the server's, the runner's or "
                   "other jobs' files; this option names one user for all jobs instead (`root`: run them as root).")
@click.option("--jobs-dir", envvar="DSTACK_JOBS_DIR", type=click.Path(path_type=Path, file_okay=False, readable=False),
              default=None, help="Where the folders of a root runner's jobs go (default: /var/lib/dstack-runner).")
@click.option("--cache-size", default="20GB", show_default=True, metavar="SIZE",
              help="Dependency blobs downloaded through the server are kept up to this size (e.g. 500MB, 1TB); "
                   "the least recently used go first.")
def start(server_url: str, token: str | None, token_file: Path | None, token_fd: int | None, name: str | None,
          labels: tuple[str, ...], backend: str | None, workdir: Path | None, idle_timeout: float | None,
          server_lost_timeout: float | None, no_docker: bool, interruptible: bool, job_user: str | None,
          jobs_dir: Path | None, cache_size: str) -> None:
    """Register with a server and execute the jobs it hands out."""
    from dstack.runner import job_user as job_users
    from dstack.storage.cache import parse_size

    _check_url(server_url)
    try:
        user = job_users.choose(job_user, jobs_dir)
    except job_users.JobUserError as e:
        raise click.BadParameter(str(e), param_hint="DSTACK_JOB_UIDS" if isinstance(e, job_users.JobUidsError)
                                 else "--job-user") from None

    try:
        cache_bytes = parse_size(cache_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--cache-size") from None
    if token_fd is not None:
        with os.fdopen(token_fd) as f:
            token = f.read()
    elif token is not None:
        _start_without_token_in_sight(token)  # does not return
    token = _token(token, token_file)
    hide_secrets()
    from dstack.runner.client import ServerClient
    from dstack.runner.daemon import Runner
    from dstack.runner.resources import detect_resources

    os.umask(job_umask())  # a job's files as the user's (a local runner inherits the server's private umask)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    resources = detect_resources()
    resources.address = _address_towards(server_url)
    if no_docker:
        resources.docker = False
    resources.interruptible = interruptible
    if user is not None:
        resources.host_user = user.name  # whom `dstack run` names as the host job's user
    if server_lost_timeout is None and idle_timeout is not None:
        server_lost_timeout = 60.0  # an on-demand runner does not wait forever for a server that is gone
    runner = Runner(ServerClient(server_url, token), resources, workdir or dstack_home() / "runner", name=name,
                    backend=backend, idle_timeout=idle_timeout, server_lost_timeout=server_lost_timeout,
                    labels=_labels(labels), cache_size=cache_bytes, job_users=user, jobs_base=jobs_dir)

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

    if user is not None and user.named:
        logging.getLogger("dstack.runner").info("host jobs run as %s (uid %d), in %s", user.name, user.named.uid,
                                                runner.jobs_dir)
    elif user is not None:
        logging.getLogger("dstack.runner").info("host jobs run each as a user of its own (uids %d-%d), in %s",
                                                user.uids[0], user.uids[-1], runner.jobs_dir)
    elif os.geteuid() == 0:
        logging.getLogger("dstack.runner").warning("host jobs run as root (--job-user root): a job can read "
                                                   "everything on this machine, the server's token included")
    try:
        runner.serve()
    except job_users.JobUserError as e:  # a jobs' folder the job user cannot reach
        raise click.BadParameter(str(e), param_hint="--jobs-dir") from None
    except (httpx.TransportError, ServerTrouble) as e:  # before DstackError: ServerTrouble is one
        raise click.ClickException(f"cannot reach the server at {server_url}: {e}") from None
    except DstackError as e:
        from dstack.core.errors import Unauthorized

        hint = ("a runner's token comes from `dstack runners add` on the server's side (shown once); a removed "
                "runner's token works no more") if isinstance(e, Unauthorized) else e.hint
        raise click.ClickException(f"{e.message}" + (f" ({hint})" if hint else "")) from None


@cli.command()
@click.option("--server", "server_url", envvar="DSTACK_SERVER_URL", required=True, help="URL of the dstack server.")
@click.option("--token", envvar="DSTACK_TOKEN", default=None,
              help="This runner's token, from `dstack runners add` (or env DSTACK_TOKEN).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read the token from this file (it is left as it is).")
@click.option("--name", default=None, help="Runner name (default: its token's).")
@click.option("--labels", "labels", multiple=True, metavar="KEY=VALUE", help="A label (repeatable), as for start.")
@click.option("--user", default=None, help="Run the runner as this user (default: root; it needs Docker's socket "
                                           "for jobs with an image).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=str(UNIT),
              show_default=True, help="Where to write the unit; its file name names the service.")
@click.option("--env-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=f"Where to write the token (mode 0600) [default: {TOKENS}/<service>.env].")
@click.option("--force", is_flag=True, help="Replace a unit that is there already.")
@click.argument("start_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- START OPTIONS]")
def install(server_url: str, token: str | None, token_file: Path | None, name: str | None, labels: tuple[str, ...],
            user: str | None, output: Path, env_file: Path | None, force: bool, start_args: tuple[str, ...]) -> None:
    """Write a systemd unit that runs `dstack-runner start` on this machine at every boot, and again whenever it
    exits; options after `--` go to `start` as they are (e.g. -- --no-docker --cache-size 100GB)."""
    from dstack.core.home import write_private
    from dstack.runner import systemd

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise click.UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
    if not token:
        raise click.UsageError("a token is needed: --token TOKEN (from `dstack runners add` on the server's "
                               "machine), env DSTACK_TOKEN, or --token-file PATH")
    if any(a == "--token" or a.startswith(("--token=", "--token-file", "--token-fd")) for a in start_args):
        raise click.UsageError("the token goes to install's own --token or --token-file, not after --")
    args = [*(["--name", name] if name else []), *(x for label in labels for x in ("--labels", label)), *start_args]
    _labels(labels)
    try:  # what start would refuse is refused now, not at every restart
        start.make_context("start", ["--server", server_url, "--token", "-", *args])
    except click.ClickException as e:
        raise click.UsageError(f"dstack-runner start would refuse {' '.join(args)}: {e.format_message()}") from None
    if not output.name.endswith(".service"):
        raise click.UsageError(f"--output {output}: a systemd service's file name ends with .service")
    if not output.parent.is_dir():
        raise click.ClickException(f"{output.parent} does not exist: is systemd this machine's init? (--output PATH "
                                   "writes the unit elsewhere)")
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists already; --force replaces it")
    env_file = env_file or TOKENS / (output.name.removesuffix(".service") + ".env")
    cmd = systemd.command(server_url, args)
    try:
        text = systemd.unit(cmd, env_file, server_url, user)
        secret = systemd.environment(token)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        env_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(env_file, secret)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(output)
    except OSError as e:
        raise click.ClickException(f"cannot write {e.filename or output}: {e.strerror} (as root, or --output and "
                                   "--env-file elsewhere)") from None
    click.echo(f"wrote {output}: runs {' '.join(cmd[3:])}\n"
               f"  as {user or 'root'}, its state in /var/lib/{systemd.STATE_DIRECTORY}, restarted whenever it exits; "
               f"its token is in {env_file} (0600)")
    click.echo(f"enable and start it (it starts at every boot then):\n  {systemd.enable_hint(output)}")
    click.echo(f"its log: journalctl -u {output.name.removesuffix('.service')} -f")


def _check_url(url: str) -> None:
    """The server's URL: http(s)://HOST[:PORT]; anything else would be retried for ever as an unreachable server."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        u.port  # noqa: B018  (raises on a port that is no number)
    except ValueError as e:
        raise click.BadParameter(f"'{url}' is not a URL ({e})", param_hint="--server") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise click.BadParameter(f"'{url}' is not the URL of a server: expected http://HOST:PORT (as `dstack server` "
                                 "prints it)", param_hint="--server")


def _token(token: str | None, token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise click.UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
        token_file.unlink(missing_ok=True)
    if not token:
        raise click.UsageError("a token is needed: --token TOKEN (from `dstack runners add` on the server's "
                               "machine), env DSTACK_TOKEN, or --token-file PATH")
    return token


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    from dstack.core.names import parse_labels

    try:
        return parse_labels(pairs)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _start_without_token_in_sight(token: str) -> None:
    """A token given by --token or DSTACK_TOKEN is in this process's command line (which every user of the
    machine can read: `ps`) or in its environment (which a job of the same user can read, /proc/PID/environ)
    for as long as it lives. So the runner starts itself again at once, without either: the token goes to the
    new process through a pipe."""
    read, write = os.pipe()
    os.write(write, token.encode())
    os.close(write)
    os.set_inheritable(read, True)
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--token":
            skip = True
        elif not arg.startswith("--token="):
            argv.append(arg)
    env = {k: v for k, v in os.environ.items() if k not in ("DSTACK_TOKEN", "DSTACK_SERVER_TOKEN")}
    os.execve(sys.executable, [sys.executable, "-m", "dstack.runner.main", *argv, "--token-fd", str(read)], env)


def _address_towards(server_url: str) -> str | None:
    """The address of this machine on the way to the server: where the jobs of a multi-node run on other
    machines reach its jobs (no packet is sent)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(server_url)
    try:
        with socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET,
                           socket.SOCK_DGRAM) as sock:
            sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
            return sock.getsockname()[0]
    except OSError:
        return None


def hide_secrets() -> None:
    """The token leaves the environment (children do not inherit it), and this process is not dumpable: a job
    that runs as the same user can read neither its /proc/PID/environ nor its memory (Linux)."""
    os.environ.pop("DSTACK_TOKEN", None)
    os.environ.pop("DSTACK_SERVER_TOKEN", None)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):  # not Linux
        pass


@cli.command(hidden=True)
@click.option("--order-file", type=click.Path(path_type=Path), default=None,
              help="Wait for this file (JSON: {\"argv\": [...]}) instead of a line on stdin (a container).")
def spare(order_file: Path | None) -> None:
    """A runner process made ahead of need (the local backend's): it imports what a runner needs and looks at the
    machine, then waits for one line on stdin, {"argv": [start's arguments], "log": PATH}, and becomes that
    runner (`start` in this process); the end of stdin (its server gone) ends it."""
    import importlib

    from dstack.runner import resources

    for module in ("dstack.runner.daemon", "dstack.runner.client", "dstack.runner.job_user", "httpx"):
        importlib.import_module(module)  # now, not when a job waits

    resources.prefetch()
    from dstack.runner.executors import host

    host.namespaces_work()  # asked once per process (a process started as root): now, not at the first job
    if order_file is not None:
        import time

        while True:  # the order comes by the container's engine (put_archive), after the token
            try:
                order = json.loads(order_file.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.01)
        order_file.unlink(missing_ok=True)
        cli(args=["start", *order["argv"]], prog_name="dstack-runner")
        return
    line = sys.stdin.readline()
    if not line:
        return
    order = json.loads(line)
    fd = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    cli(args=["start", *order["argv"]], prog_name="dstack-runner")


def main() -> None:
    cli(prog_name="dstack-runner")  # also when run as `python -m dstack.runner.main` (the local backend, a re-exec)


if __name__ == "__main__":
    main()
