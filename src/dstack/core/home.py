"""DSTACK_HOME (default ~/.dstack): all local state of the CLI, the embedded server and local runners."""

from __future__ import annotations

import os
from pathlib import Path


def dstack_home() -> Path:
    return Path(os.environ.get("DSTACK_HOME") or Path.home() / ".dstack").expanduser()


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (mode 0600 from the first byte)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
