"""A store in a local folder (default: DSTACK_HOME/storage).

Layout: artifacts/<job_id>/<path>/ (read-only once saved), code/<sha256>.tar.gz, tmp/ (staging;
anything there is unfinished and is never read)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from pathlib import Path

from dstack.core.errors import NotFound
from dstack.storage.base import ArtifactInfo


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("artifacts", "code", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _final(self, job_id: str, path: str) -> Path:
        return self.root / "artifacts" / job_id / path

    def save_artifact(self, job_id: str, path: str, source: Path) -> ArtifactInfo:
        staging = self.root / "tmp" / f"{job_id}-{uuid.uuid4().hex}"
        files = size = 0
        try:
            if source.is_dir():
                shutil.copytree(source, staging, symlinks=True)
            else:
                staging.mkdir()
            for dirpath, _dirs, names in os.walk(staging):
                for n in names:
                    st = os.lstat(os.path.join(dirpath, n))
                    files += 1
                    size += st.st_size
            final = self._final(job_id, path)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)  # atomic: visible whole or not at all
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        _make_read_only(final)
        return ArtifactInfo(path=path, files=files, size=size)

    def artifact_dir(self, job_id: str, path: str) -> Path | None:
        d = self._final(job_id, path)
        return d if d.is_dir() else None

    def download_artifact(self, job_id: str, path: str, dest: Path) -> None:
        src = self.artifact_dir(job_id, path)
        if src is None:
            raise NotFound(f"artifact '{path}' of job {job_id} is not in the store")
        shutil.copytree(src, dest, symlinks=True)

    def put_code(self, digest: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError("code archive does not match its hash")
        final = self.root / "code" / f"{digest}.tar.gz"
        if final.exists():
            return
        tmp = self.root / "tmp" / f"code-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, final)

    def get_code(self, digest: str) -> bytes | None:
        p = self.root / "code" / f"{digest}.tar.gz"
        return p.read_bytes() if p.exists() else None

    def has_code(self, digest: str) -> bool:
        return (self.root / "code" / f"{digest}.tar.gz").exists()

    def delete_job(self, job_id: str) -> None:
        d = self.root / "artifacts" / job_id
        if d.exists():
            for dirpath, dirs, _ in os.walk(d):
                for name in dirs:
                    os.chmod(os.path.join(dirpath, name), 0o755)
            os.chmod(d, 0o755)
            shutil.rmtree(d, ignore_errors=True)


def _make_read_only(root: Path) -> None:
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for n in files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(p, st.st_mode & ~0o222)
        for n in dirs:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, os.lstat(p).st_mode & ~0o222)
    os.chmod(root, os.stat(root).st_mode & ~0o222)


def open_store(config: dict) -> LocalStore:
    kind = config.get("type", "local")
    if kind != "local":
        raise NotFound(f"unknown artifact store type '{kind}'")
    return LocalStore(Path(config["path"]))
