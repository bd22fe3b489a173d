"""Recreating a run's code on the runner, byte for byte, from its snapshot: a git clone at the recorded
commit with the diff applied and the files that travel whole (untracked, or too large for the diff)
laid over it, or the tar of the files; then the tree hash proves that the copy is the one captured."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from dstack.core.code import CodeError, CodeSnapshot, blob_hash, machine_id, tree_hash, walk_tree
from dstack.core.sizes import plural

GIT_TIMEOUT = 600  # a clone may be large

# variables that would point git at another repository than the one it is asked to make
_GIT_LOCATION_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                      "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_PREFIX")
# checkout and apply write files exactly as the blobs hold them
_GIT_CONFIG = ("-c", "core.autocrlf=false", "-c", "core.symlinks=true", "-c", "core.fileMode=true",
               "-c", "advice.detachedHead=false")


def recreate(snapshot: CodeSnapshot, fetch: Callable[[str], bytes], dest: Path) -> Path:
    """Makes the captured tree in `dest` (which must be empty or absent) and returns the job's root in it.
    `fetch(hash)` gives a blob by its sha256. Raises CodeError when the tree cannot be made or differs from
    the one captured."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise CodeError(f"cannot recreate the code in {dest}: the folder is not empty")
    blobs = {h: _blob(fetch, h) for h in snapshot.blob_hashes()}  # all of them before a long clone
    if snapshot.mode == "git":
        _clone(snapshot, dest)
        if snapshot.diff_hash:
            _git(dest, "apply", "--binary", "--whitespace=nowarn", "-", stdin=blobs[snapshot.diff_hash],
                 what="apply the uncommitted changes")
        if snapshot.files_hash:
            extract(blobs[snapshot.files_hash], dest, replace=True)
    else:
        if not snapshot.archive_hash:
            raise CodeError("the code's snapshot names no archive")
        extract(blobs[snapshot.archive_hash], dest)
    files = walk_tree(dest)
    actual = tree_hash(dest, files)
    if actual != snapshot.tree_hash:
        raise CodeError(
            f"the recreated code differs from what was captured: {plural(len(files), 'file')} with tree hash "
            f"{actual[:12]}, captured {plural(snapshot.files, 'file')} with tree hash {snapshot.tree_hash[:12]}",
            hint="a .gitattributes filter (e.g. git-lfs), end-of-line conversion or a file changed while "
                 "`dstack run` read it can cause this; commit or stash such changes and run again")
    root = _inside(dest, snapshot.subdir)
    root.mkdir(parents=True, exist_ok=True)
    return dest / root.relative_to(dest.resolve())


def _blob(fetch: Callable[[str], bytes], digest: str) -> bytes:
    data = fetch(digest)
    if blob_hash(data) != digest:
        raise CodeError(f"the code blob {digest[:12]} is corrupted: its content does not match its hash")
    return data


def _inside(dest: Path, rel: str) -> Path:
    path = (dest / rel).resolve()
    if not path.is_relative_to(dest.resolve()):
        raise CodeError(f"the project's folder {rel!r} lies outside the code")
    return path


# --- git ---------------------------------------------------------------------------------------------


def _git(cwd: Path, *args: str, what: str, stdin: bytes | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env["GIT_TERMINAL_PROMPT"] = "0"  # a private repo without credentials fails instead of waiting
    try:
        p = subprocess.run(["git", *_GIT_CONFIG, *args], cwd=cwd, input=stdin, capture_output=True, env=env,
                           timeout=GIT_TIMEOUT)
    except FileNotFoundError:
        raise CodeError(f"cannot {what}: git is not installed on the runner") from None
    except subprocess.TimeoutExpired:
        raise CodeError(f"cannot {what}: git took more than {GIT_TIMEOUT} s") from None
    if p.returncode != 0:
        raise CodeError(f"cannot {what}: {p.stderr.decode(errors='replace').strip()}")


def _clone(snapshot: CodeSnapshot, dest: Path) -> None:
    if not (snapshot.repo_url and snapshot.commit):
        raise CodeError("the code's snapshot names no repository or commit")
    source = snapshot.repo_url
    if (snapshot.local_repo and snapshot.machine_id and snapshot.machine_id == machine_id()
            and (Path(snapshot.local_repo) / ".git").exists()):
        source = snapshot.local_repo  # the same machine: a local clone (hard links), no network
    _git(dest, "clone", "--no-checkout", "--quiet", "--", source, ".", what=f"clone {source}")
    if source != snapshot.repo_url:
        _git(dest, "remote", "set-url", "origin", snapshot.repo_url, what="set the remote's URL")
    try:
        _git(dest, "checkout", "--quiet", "--detach", snapshot.commit, what=f"check out {snapshot.commit}")
    except CodeError:  # not on a branch any more (e.g. force-pushed away): ask for it by id
        _git(dest, "fetch", "--quiet", "origin", snapshot.commit,
             what=f"fetch commit {snapshot.commit} from {snapshot.repo_url}")
        _git(dest, "checkout", "--quiet", "--detach", snapshot.commit, what=f"check out {snapshot.commit}")


# --- tar ---------------------------------------------------------------------------------------------


def _member_path(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or not parts or ".." in parts or ".git" in parts:
        raise CodeError(f"refusing to extract {name!r}: it would land outside the job's folder or in .git")
    return "/".join(parts)


def _make_dirs(dest: Path, rel: str, made: set[str]) -> None:
    """Creates the folders of `rel` under dest; refuses to go through a symlink (or anything not a folder)."""
    path = ""
    for part in rel.split("/") if rel else ():
        path = f"{path}/{part}" if path else part
        if path in made:
            continue
        full = dest / path
        try:
            mode = full.lstat().st_mode
        except FileNotFoundError:
            full.mkdir()
        else:
            if not stat.S_ISDIR(mode):
                raise CodeError(f"refusing to extract under {path!r}: it is not a folder (a symlink?)")
        made.add(path)


def _unlink(path: Path) -> None:
    """Removes a file or symlink (never what it points to); a folder stays, and creating over it fails."""
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def extract(blob: bytes, dest: Path, replace: bool = False) -> None:
    """Extracts a code tar (as the CLI makes them: files, symlinks, folders) into dest; with `replace`,
    over files and symlinks already there. Nothing is written outside dest: members with absolute paths or
    `..`, through symlinks, or of other types are refused. Symlinks are made last, and may point anywhere
    (as git makes them)."""
    made: set[str] = set()
    links: list[tuple[str, str]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for m in tar:
                rel = _member_path(m.name)
                if m.isdir():
                    _make_dirs(dest, rel, made)
                elif m.isreg():
                    _make_dirs(dest, rel.rpartition("/")[0], made)
                    src = tar.extractfile(m)
                    if replace:
                        _unlink(dest / rel)
                    fd = os.open(dest / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    os.fchmod(fd, 0o755 if m.mode & 0o100 else 0o644)  # whatever the umask
                    with os.fdopen(fd, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)
                elif m.issym():
                    links.append((rel, m.linkname))
                else:
                    raise CodeError(f"refusing to extract {m.name!r}: not a file, folder or symlink")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CodeError(f"cannot extract the code: {e}") from None
    for rel, target in links:
        _make_dirs(dest, rel.rpartition("/")[0], made)
        try:
            if replace:
                _unlink(dest / rel)
            os.symlink(target, dest / rel)
        except OSError as e:
            raise CodeError(f"cannot make the symlink {rel!r}: {e.strerror}") from None
