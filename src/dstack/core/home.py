"""DSTACK_HOME (default ~/.dstack): all local state of the CLI, the embedded server and local runners. It is
private: readable by its owner only (see private_home)."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
JOB_UMASK_ENV = "DSTACK_JOB_UMASK"


# in DSTACK_HOME/server: the local server was stopped on purpose (`dstack server stop`, a signal), so that an
# attached run does not start it again as it does a server that was killed or crashed
SERVER_STOPPED = "stopped"


def dstack_home() -> Path:
    return Path(os.environ.get("DSTACK_HOME") or Path.home() / ".dstack").expanduser()


def private_home(home: Path | None = None) -> Path:
    """DSTACK_HOME, private: made 0700 when it is missing, and tightened to 0700 when others may enter it (one
    that an older dstack made 0755). What it holds (the database with variable values, logs, code, the artifact
    store, runners' folders, the token) is then out of other users' reach whatever its own modes: the store's
    blobs, for one, stay 0444 (read-only marks, sharing their inodes with the trees that jobs' containers mount,
    whose users need not be the owner), and a job's own files are the job's business."""
    home = home or dstack_home()
    try:
        st = home.stat()
    except FileNotFoundError:
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            home.mkdir(mode=0o700)
        except FileExistsError:  # another dstack process made it meanwhile
            pass
        st = home.stat()
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(home, 0o700)
    return home


def private_umask() -> int:
    """What this process creates from now on is its owner's only (umask 0o077): for the server, whose files are
    all state. The umask it had (the user's) is kept in the environment as DSTACK_JOB_UMASK, for the processes
    it starts that make a job's files (local runners, see job_umask). Returns it."""
    old = os.umask(PRIVATE_UMASK)
    if not os.environ.get(JOB_UMASK_ENV):  # set by a process that started this one: that one had the user's
        os.environ[JOB_UMASK_ENV] = f"{old:03o}"
    return old


def job_umask() -> int:
    """The umask that a job's files are made with: the user's, as private_umask found it in the process that
    started this one, else this process's own."""
    try:
        return int(os.environ[JOB_UMASK_ENV], 8) & 0o777
    except (KeyError, ValueError):
        current = os.umask(0)
        os.umask(current)
        return current


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (mode 0600 from the first byte)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
