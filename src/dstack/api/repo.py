"""The user's project: its root, its identity (repo_id), and its code packed for the runner."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from dstack.core.models import CodeRef


def find_project(start: Path | None = None) -> Path:
    """The nearest folder (from cwd up) with a .dstack folder; else the git root; else cwd."""
    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / ".dstack").is_dir():
            return d
    root = _git(start, "rev-parse", "--show-toplevel")
    return Path(root) if root else start


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode(errors="replace").strip() if out.returncode == 0 else None


def repo_id(project: Path) -> str:
    """Runs and tags belong to a repo: its git remote if it has one, else the project folder."""
    return _git(project, "config", "--get", "remote.origin.url") or str(project)


def _ignore_patterns(project: Path) -> list[str]:
    f = project / ".dstackignore"
    if not f.exists():
        return []
    return [ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for p in patterns:
        p = p.rstrip("/")
        if fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts):
            return True
    return False


def list_files(project: Path) -> list[str]:
    """Files to send: git's tracked and untracked-but-not-ignored files, else the whole folder;
    minus .dstackignore."""
    out = _git(project, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is not None and (project / ".git").exists():
        files = sorted({f for f in out.split("\0") if f and os.path.lexists(project / f)})
    else:
        files = []
        for dirpath, dirs, names in os.walk(project):
            dirs[:] = sorted(d for d in dirs if d not in (".git", "__pycache__"))
            for n in sorted(names):
                files.append(os.path.relpath(os.path.join(dirpath, n), project))
    patterns = _ignore_patterns(project)
    return [f for f in files if not _ignored(f, patterns)]


def pack_code(project: Path) -> tuple[str, bytes, CodeRef]:
    """A gzip'd tar of the project's files (deterministic: sorted, no times), its sha256, and the code's
    version as git sees it."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in list_files(project):
            info = tar.gettarinfo(str(project / rel), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isreg():
                with open(project / rel, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    ref = CodeRef(archive_hash=digest)
    if (project / ".git").exists():
        ref.repo_url = _git(project, "config", "--get", "remote.origin.url")
        ref.branch = _git(project, "rev-parse", "--abbrev-ref", "HEAD")
        ref.commit = _git(project, "rev-parse", "HEAD")
        ref.dirty = bool(_git(project, "status", "--porcelain"))
    return digest, data, ref
