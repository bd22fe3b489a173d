"""A run's code, as the CLI captured it and the runner recreates it: the snapshot that a run records,
and the tree hash that both sides compute the same way to prove that the runner's copy is exact."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from dstack.core.errors import DstackError


class CodeError(DstackError):
    """The code could not be captured or recreated as recorded."""


@dataclass(kw_only=True)
class CodeSnapshot:
    """What a run records about its code. A dataclass, not a pydantic model, so that capturing the code costs
    the CLI no pydantic; the models that hold one (a run, a job spec) validate it all the same.

    `git` mode: the runner clones `repo_url`, checks out `commit`, applies the binary diff
    (`diff_hash`: staged and unstaged changes against `commit`) and extracts over it the files that
    travel whole (`files_hash`: a tar of the untracked, not ignored files, and of the changed files too
    large for a diff, which it leaves out). `archive` mode: the runner extracts the tar of the files
    (`archive_hash`); `repo_url`/`branch`/`commit` are then informative only. Blobs are stored by their
    sha256. The tree is the whole git work tree when the project lies in one, else the project's folder;
    `subdir` is where the project lies in it (the job's root). `tree_hash` is `tree_hash()` of that tree,
    `files` and `size` its number of files and symlinks and its bytes."""

    mode: Literal["git", "archive"]
    repo_url: str | None = None
    branch: str | None = None
    commit: str | None = None
    dirty: bool = False
    subdir: str = "."
    diff_hash: str | None = None
    files_hash: str | None = None
    archive_hash: str | None = None
    tree_hash: str
    files: int = 0
    size: int = 0
    # where the repository lies on the machine that captured it: a runner on that same machine clones
    # from there (fast, and no network or credentials needed) instead of from `repo_url`
    local_repo: str | None = None
    machine_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CodeSnapshot:
        """As `to_dict` gave it; keys this version does not know (a record of another version) are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def blob_hashes(self) -> list[str]:
        """The blobs the runner needs, by hash."""
        return [h for h in (self.diff_hash, self.files_hash, self.archive_hash) if h]


# --- the tree hash -----------------------------------------------------------------------------------

SYMLINK, FILE, EXECUTABLE = "l", "f", "x"

_SMALL = 1 << 20  # read at once; larger files are hashed in chunks
Entry = tuple[str, str, str]  # (relative posix path, kind, sha256 of the content | symlink target)


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(root: Path, rel: str) -> tuple[Entry, int] | None:
    """The tree entry of one path and its size in bytes; None for what a tree does not hold
    (directories, sockets, missing paths)."""
    path = os.path.join(root, rel)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return (rel, SYMLINK, os.readlink(path)), 0
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_size <= _SMALL:  # most files: one read, no file object
        fd = os.open(path, os.O_RDONLY)
        try:
            h = hashlib.sha256(os.read(fd, st.st_size + 1))
            while chunk := os.read(fd, _SMALL):  # it grew meanwhile
                h.update(chunk)
        finally:
            os.close(fd)
        digest = h.hexdigest()
    else:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    return (rel, EXECUTABLE if st.st_mode & stat.S_IXUSR else FILE, digest), st.st_size


def tree_digest(entries: Iterable[Entry]) -> str:
    """sha256 over the sorted entries; each field NUL-terminated (paths and link targets hold no NUL)."""
    h = hashlib.sha256()
    for rel, kind, value in sorted(entries):
        h.update(b"%s\0%s\0%s\0" % (os.fsencode(rel), kind.encode(), os.fsencode(value)))
    return h.hexdigest()


def tree_hash(root: Path, files: Iterable[str]) -> str:
    """The hash of these files (relative posix paths) of the tree at `root`: path, executable bit,
    and content (or a symlink's target). Directories, and so empty ones, do not count."""
    entries = []
    for rel in files:
        e = file_entry(root, rel)
        if e is not None:
            entries.append(e[0])
    return tree_digest(entries)


def walk_tree(root: Path) -> list[str]:
    """Every file and symlink under `root` (symlinks are not followed), as sorted relative posix paths;
    anything named `.git` is skipped, at any depth."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        keep = []
        for d in dirs:
            if d == ".git":
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                out.append(prefix + d)  # a symlink to a directory is a symlink
            else:
                keep.append(d)
        dirs[:] = keep
        out.extend(prefix + n for n in names if n != ".git")
    return sorted(out)


def machine_id() -> str | None:
    """This machine's identity (systemd's machine-id, else the boot id), to tell "the same machine"."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return None
