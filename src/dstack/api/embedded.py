"""Which server the CLI talks to: DSTACK_SERVER_URL + DSTACK_TOKEN, else DSTACK_HOME/config.yml, else the
embedded local server, started in the background on first use (state under DSTACK_HOME)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dstack import __version__
from dstack.api.client import Client
from dstack.core.errors import DstackError
from dstack.core.home import SERVER_STOPPED, dstack_home, private_home, write_private
from dstack.core.processes import read_record, runner_stop_wait, terminate, terminate_all
from dstack.core.status import JobStatus

START_TIMEOUT = 30.0
LOCAL_UNREACHABLE = ("the local server has stopped (`dstack server stop`?); the next dstack command starts it "
                     "again, and `dstack status` then shows what became of the runs")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _served(sdir: Path) -> bool:
    """Whether a server process holds DSTACK_HOME/server/server.lock (it does for as long as it runs)."""
    try:
        f = open(sdir / "server.lock", "rb")
    except OSError:  # none there (or not ours to read): no server of ours
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _server_record(sdir: Path) -> dict | None:
    """server.json, when the process it names is still our server (its pid alone may be another program's now)."""
    # a record of dstack before 0.3.1 (no start time): this home's server, by its command line
    info = read_record(sdir / "server.json", legacy=f"dstack.server.main --home {sdir.parent} ")
    if info is None or info.get("legacy"):
        return info  # a server of dstack before 0.3.1 holds no lock: its record and command line tell
    return info if _served(sdir) else None


def configured() -> tuple[str, str] | None:
    url, token = os.environ.get("DSTACK_SERVER_URL"), os.environ.get("DSTACK_TOKEN")
    if url and token:
        return url, token
    if url or token:
        missing = "DSTACK_TOKEN" if url else "DSTACK_SERVER_URL"
        raise DstackError(f"{'DSTACK_SERVER_URL' if url else 'DSTACK_TOKEN'} is set but {missing} is not",
                          hint="set both to use another server, or neither to use the local one")
    cfg = dstack_home() / "config.yml"
    if cfg.exists():
        import yaml

        try:
            data = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as e:
            raise DstackError(f"{cfg} is not valid YAML: {e}") from None
        if isinstance(data, dict) and data.get("server") and data.get("token"):
            return str(data["server"]), str(data["token"])
        raise DstackError(f"{cfg} must set 'server' and 'token'", hint="delete it to use the local server")
    return None


def local_server(home: Path | None = None) -> tuple[str, str] | None:
    """The running local server, if any: (url, token)."""
    found = _running(home)
    return found[:2] if found else None


def _running(home: Path | None) -> tuple[str, str, str] | None:
    """The running local server's url, token and dstack version (as server.json says), if one runs."""
    sdir = (home or dstack_home()) / "server"
    info = _server_record(sdir)
    if info:
        try:
            return info["url"], (sdir / "token").read_text().strip(), info.get("version", "an older version")
        except OSError:
            return None
    return None


def unfinished_runs(client: Client) -> list[str]:
    """The names of the server's runs (of every project) that have not finished: a server stopped now loses them."""
    return [r["run_name"] for r in client.runs(None, limit=1000) if not JobStatus(r["status"]).finished]


def _current_local_server(home: Path | None = None) -> tuple[str, str] | None:
    """The running local server, if it runs this version of dstack. One left running by an older (or newer)
    dstack speaks another API: it is stopped when it has nothing unfinished, so that the caller starts this
    version's; otherwise that is an error saying what to do."""
    found = _running(home)
    if found is None:
        return None
    url, token, version = found
    if version == __version__:
        return url, token
    try:
        busy = unfinished_runs(Client(url, token))
    except DstackError:
        busy = []
    if busy:
        raise DstackError(
            f"the local server runs dstack {version}, and this is dstack {__version__}; it has unfinished runs "
            f"({', '.join(busy[:5])}), so it was left running",
            hint="let them finish (or `dstack stop RUN`), then run the command again; `dstack server stop "
                 "--force` stops it now and loses them")
    stop_local_server(home)
    return None


def start_local_server(home: Path | None = None, unless_stopped: bool = False,
                       say: Callable[[str], None] | None = None) -> tuple[str, str]:
    """The local server, started in the background unless one runs. `unless_stopped`: not when it was
    stopped on purpose (`dstack server stop`, a signal); it was killed or crashed otherwise. `say(line)` is
    told when a server is started, and why."""
    home = private_home(home)
    sdir = home / "server"
    sdir.mkdir(parents=True, exist_ok=True)
    with _start_lock(sdir):  # two CLIs starting at once start one server; a stop waits for a start
        running = local_server(home)
        if running:
            return running
        if unless_stopped and (sdir / SERVER_STOPPED).exists():
            raise DstackError("the local server was stopped (`dstack server stop`, or Ctrl-C on `dstack server`)",
                              hint="the jobs of its local runners were stopped with it, a job on a self-hosted "
                                   "runner goes on; `dstack status RUN` (which starts the server again) says what "
                                   "became of a run, and `dstack logs RUN -f` follows it again")
        if say is not None:
            say(f"Starting the local dstack server again (it ended without being stopped: killed or crashed; "
                f"its log: {sdir / 'server.log'})" if unless_stopped else
                f"Starting the local dstack server in the background (state in {home}; `dstack server stop` "
                f"stops it)")
        (sdir / SERVER_STOPPED).unlink(missing_ok=True)
        log = open(sdir / "server.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dstack.server.main", "--home", str(home)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            info = _read_json(sdir / "server.json")
            if info and info.get("pid") == proc.pid:
                return info["url"], (sdir / "token").read_text().strip()
            if proc.poll() is not None:
                running = local_server(home)  # e.g. `dstack server` in the foreground won the race
                if running:
                    return running
                break
            time.sleep(0.05)
        tail = (sdir / "server.log").read_text(errors="replace")[-2000:]
        raise DstackError(f"the local server did not start; its log ({sdir / 'server.log'}) ends with:\n{tail}")


def restart_crashed_server(home: Path | None = None) -> tuple[str, str]:
    """The local server, started again if it died without being stopped (killed, crashed); it comes back at
    its address. A server that was stopped on purpose stays stopped."""
    return start_local_server(home, unless_stopped=True, say=_to_stderr)


def _to_stderr(line: str) -> None:
    sys.stderr.write(f"[dstack: {line}]\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _start_lock(sdir: Path):
    with open(sdir / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stop_local_server(home: Path | None = None, timeout: float = 30.0) -> bool:
    """Stop the local server, then any runner that a server of this DSTACK_HOME started and that outlived it
    (its server was killed). True when there was something to stop. Only processes recorded with their start
    time are signalled: never a program that took over a stale pid."""
    home = home or dstack_home()
    sdir = home / "server"
    if not sdir.is_dir():
        return False
    with _start_lock(sdir):  # no start half-way meanwhile, nor an attached run's restart of what is stopped
        write_private(sdir / SERVER_STOPPED, "")
        info = _server_record(sdir)
        stopped = bool(info) and terminate(int(info["pid"]), info.get("started"), grace=timeout)
        (sdir / "server.json").unlink(missing_ok=True)
        runners = [read_record(path) for path in sorted((home / "runners").glob("*/runner.json"))]
        found = [(int(r["pid"]), r.get("started")) for r in runners if r is not None]
        return terminate_all(found, grace=runner_stop_wait()) > 0 or stopped


def connect() -> Client:
    remote = configured()
    if remote:
        return Client(*remote)
    found = _current_local_server() or start_local_server(say=_to_stderr)
    return Client(*found, unreachable_hint=LOCAL_UNREACHABLE, restart=restart_crashed_server)
