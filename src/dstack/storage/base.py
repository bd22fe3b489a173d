"""The artifact store: saved job outputs and code archives. Known to the server and runners, never
to the CLI (which reaches it only through the server's API)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel


class ArtifactInfo(BaseModel):
    path: str  # as declared by the workflow, relative to the job's working folder
    files: int
    size: int


class ArtifactStore(Protocol):
    def save_artifact(self, job_id: str, path: str, source: Path) -> ArtifactInfo:
        """Save the folder `source` as artifact `path` of `job_id`: all of it or nothing, then immutable."""

    def artifact_dir(self, job_id: str, path: str) -> Path | None:
        """A local folder holding the saved artifact (to mount read-only), or None if not on this disk."""

    def download_artifact(self, job_id: str, path: str, dest: Path) -> None:
        """Copy a saved artifact into `dest` (which must not exist yet)."""

    def put_code(self, digest: str, data: bytes) -> None: ...

    def get_code(self, digest: str) -> bytes | None: ...

    def has_code(self, digest: str) -> bool: ...
