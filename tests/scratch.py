"""Scratch folders of a test session's own daemons (tests/slurm.py, tests/sshd.py): each says which process made
it, so that the next session removes those of a session that died (SIGKILL) before its clean-up."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dstack.core.processes import is_running, start_time


def owned_folder(prefix: str) -> Path:
    """A new folder in /tmp named `prefix...`, marked as this process's."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / "owner.json").write_text(json.dumps({"pid": os.getpid(), "started": start_time(os.getpid())}))
    return folder


def sweep(prefix: str, kill: Callable[[Path], None]) -> None:
    """The folders `prefix...` of processes that are gone: what runs from them killed (`kill`), then removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        if not is_running(owner.get("pid"), owner.get("started")):
            kill(folder)
            shutil.rmtree(folder, ignore_errors=True)
