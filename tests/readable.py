"""dstack's code and packages where another user (the test hosts' `nobody`) can read them.

Tests run a runner as nobody from this checkout. A checkout in a folder that nobody cannot enter (a clone in
`mktemp -d`, 0700; one under /root) is linked (`cp -al`: no bytes copied) into a folder that anyone may read, once
per test session; a checkout that nobody can read already is used as it is."""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Paths:
    repo: Path  # holds src/ and tests/
    site: Path  # the packages dstack needs

    @property
    def pythonpath(self) -> str:
        return f"{self.site}:{self.repo / 'src'}"


def _can_read(user: str, path: Path) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)], capture_output=True,
                          timeout=30).returncode == 0


@functools.cache
def for_user(user: str = "nobody") -> Paths:
    site = Path(sysconfig.get_paths()["purelib"])
    here = Paths(REPO, site)
    if _can_read(user, REPO / "src" / "dstack" / "__init__.py") and _can_read(user, site):
        return here
    folder = Path(tempfile.mkdtemp(prefix="dstack-readable-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    folder.chmod(0o755)
    for src, dest in ((REPO / "src", folder / "repo" / "src"), (REPO / "tests", folder / "repo" / "tests"),
                      (site, folder / "site")):
        dest.parent.mkdir(parents=True, exist_ok=True)
        linked = subprocess.run(["cp", "-al", str(src), str(dest)], capture_output=True, text=True)
        if linked.returncode != 0:  # another file system: copy
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest, symlinks=True)
    if not _can_read(user, folder / "repo" / "src" / "dstack" / "__init__.py"):
        raise RuntimeError(f"{user} cannot read dstack's code even in {folder}: are its files readable by all?")
    return Paths(folder / "repo", folder / "site")
