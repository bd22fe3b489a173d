"""A PostgreSQL cluster of the test session's own, from Debian's `postgresql` package (scripts/test.sh installs
it), never the system's service: `initdb` into a temporary folder (as the user `postgres` when the tests run as
root: PostgreSQL refuses to run as root), `pg_ctl start` on a free port of 127.0.0.1 with its socket in that
folder, a database per test (`database()`), stopped and removed at the end. A folder that a killed session
left behind (its owner is gone) is stopped and removed by the next session that starts a cluster."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from dstack.core.processes import is_running, start_time

PREFIX = "dstack-test-pg-"
USER = "postgres"


def bin_dir() -> Path | None:
    """The newest PostgreSQL's programs: Debian keeps them in /usr/lib/postgresql/<major>/bin, off PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                      if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, folder: Path, port: int, bindir: Path):
        self.folder, self.port, self.bindir = folder, port, bindir
        self.data = folder / "data"

    @classmethod
    def start(cls, fast: bool = True) -> Cluster:
        """A new cluster, running. `fast`: durability off (fsync, synchronous commit), as tests want it."""
        bindir = bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (scripts/test.sh does "
                               "it); no service is started, the tests start a cluster of their own")
        sweep()
        folder = Path(tempfile.mkdtemp(prefix=PREFIX))
        (folder / "owner.json").write_text(json.dumps({"pid": os.getpid(), "started": start_time(os.getpid())}))
        if os.geteuid() == 0:
            pw = pwd.getpwnam(USER)
            os.chown(folder, pw.pw_uid, pw.pw_gid)
        cluster = cls(folder, 0, bindir)
        try:
            cluster._as_owner([bindir / "initdb", "-D", str(cluster.data), "-U", "postgres", "-A", "trust",
                               "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(folder),
                        "max_connections": "200"}
            if fast:
                settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
            with open(cluster.data / "postgresql.auto.conf", "a") as f:
                f.writelines(f"{k} = '{v}'\n" for k, v in settings.items())
            for _ in range(5):  # the port may be taken between asking and binding: another then
                cluster.port = _free_port()
                p = cluster._as_owner([bindir / "pg_ctl", "-D", str(cluster.data), "-l", str(folder / "log"),
                                       "-o", f"-p {cluster.port}", "-w", "-t", "60", "start"], check=False)
                if p.returncode == 0:
                    return cluster
            log = (folder / "log").read_text(errors="replace")[-3000:] if (folder / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {p.stdout}{p.stderr}\n{log}")
        except BaseException:
            cluster.stop()
            raise

    def _as_owner(self, cmd: list, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(c) for c in cmd]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=self.folder, timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def url(self, database: str = "postgres", driver: str = "asyncpg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database,
                             autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []

    def database(self) -> str:
        """A new, empty database: its SQLAlchemy async URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def _pg_ctl(self, *args: str) -> None:
        self._as_owner([self.bindir / "pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                        "-t", "60", *args])

    def pause(self) -> None:
        """Stop the database server (its connections break), keeping its data: `resume()` starts it again."""
        self._pg_ctl("-m", "fast", "stop")

    def resume(self) -> None:
        self._pg_ctl("-o", f"-p {self.port}", "start")

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "-o", f"-p {self.port}", "restart")

    def stop(self) -> None:
        _stop(self.folder, self.bindir)


def _stop(folder: Path, bindir: Path | None) -> None:
    data = folder / "data"
    if bindir is not None and (data / "postmaster.pid").exists():
        cmd = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        subprocess.run(cmd, capture_output=True, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def sweep() -> None:
    """Stop and remove the clusters of test sessions that are gone (killed before their clean-up)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if not is_running(owner.get("pid"), owner.get("started")):
            _stop(folder, bin_dir())
