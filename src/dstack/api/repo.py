"""The user's project: its root, its identity (repo_id), and its code packed for the runner."""

from __future__ import annotations

import subprocess
from pathlib import Path


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
