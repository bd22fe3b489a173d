"""`dstack-runner install`: a systemd unit that keeps a self-hosted runner serving jobs across reboots and crashes.

The unit runs `dstack-runner start --server URL ...` (this Python, this dstack) with its DSTACK_HOME in systemd's
state folder (/var/lib/dstack-runner), restarted whenever it exits. The token is in an environment file of its
own (mode 0600, root's: systemd reads it before it starts the runner), never in the unit, which anyone may read;
the runner moves it out of its environment at once (see main.start)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dstack import __version__
from dstack.core.processes import runner_stop_wait

UNIT = Path("/etc/systemd/system/dstack-runner.service")
TOKENS = Path("/etc/dstack-runner")  # the units' token files: <unit>.env
STATE_DIRECTORY = "dstack-runner"  # /var/lib/dstack-runner: the runner's DSTACK_HOME

_PLAIN = re.compile(r"[A-Za-z0-9_./:=,@+-]+")


def quote(arg: str) -> str:
    """One argument of ExecStart=, as systemd splits and expands them: quoted when it holds anything but plain
    characters, and its % (a specifier) and $ (a variable) doubled, so that it reaches the runner as it is."""
    if "\n" in arg or "\0" in arg:
        raise ValueError(f"an argument of the runner's command may not hold a line break: {arg!r}")
    text = arg if _PLAIN.fullmatch(arg) else '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text.replace("%", "%%").replace("$", "$$")


def command(server_url: str, start_args: list[str]) -> list[str]:
    """The runner's command line: this Python running `dstack-runner start`."""
    return [sys.executable, "-m", "dstack.runner.main", "start", "--server", server_url, *start_args]


def unit(cmd: list[str], env_file: Path, server_url: str, user: str | None = None) -> str:
    """The text of the unit that runs `cmd`, with the environment of `env_file`."""
    # the runner stops its jobs when told to stop (SIGTERM: their stop grace, then their reports): systemd waits
    # for that before it kills what is left
    stop_timeout = int(runner_stop_wait()) + 30
    lines = [
        f"# written by `dstack-runner install` (dstack {__version__}); the token is in {env_file}",
        "[Unit]",
        f"Description=dstack runner: runs the jobs of the dstack server at {server_url}".replace("%", "%%"),
        "Wants=network-online.target",
        "After=network-online.target docker.service",
        "",
        "[Service]",
        "Type=simple",
        f"EnvironmentFile={env_file}",
        f"Environment=DSTACK_HOME=/var/lib/{STATE_DIRECTORY}",
        f"StateDirectory={STATE_DIRECTORY}",
        "StateDirectoryMode=0700",
        *([f"User={user}"] if user else []),
        "ExecStart=" + " ".join(quote(a) for a in cmd),
        "Restart=always",
        "RestartSec=5",
        # SIGTERM to the runner alone, which stops its jobs; SIGKILL to all that is left after the timeout
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def environment(token: str) -> str:
    """The environment file's text: the runner's token."""
    if not token or any(c in token for c in "\n\r\0"):
        raise ValueError("the token is empty or holds a line break")
    return "# the token of a dstack runner (dstack-runner install): keep this file private\n" \
           f'DSTACK_TOKEN="{token.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"\n'


def enable_hint(unit_path: Path) -> str:
    name = unit_path.name.removesuffix(".service")
    return f"systemctl daemon-reload && systemctl enable --now {name}"
