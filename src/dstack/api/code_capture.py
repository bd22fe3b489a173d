"""Code capture: what `dstack run` records of the project's code so that the runner recreates that
exact tree. In a git repo whose HEAD is on a remote: (remote, branch, commit), the binary diff of the
staged and unstaged changes, and a tar of the untracked files (and of changed files too large for a
diff). Anything else (no git, no commits, no remote, a commit not pushed): a tar of the files. In a git
work tree the whole work tree is captured, and `subdir` says where the project lies in it. .gitignore
and .dstackignore are honoured (.dstackignore only leaves out files that git does not track).

Artifact folders are outputs, never code: what git does not track in the folders that the project's
workflows declare under `artifacts:` (or mount their dependencies at) is left out, so that a past run's
artifacts downloaded into the project neither travel into the next run's artifact nor hide its dependency.
What git tracks there is the commit's code, and is captured.

The blobs (diff, tars) are returned by their sha256 for the caller to upload; the snapshot refers to
them by hash."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
import zlib
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from dstack.core.code import (
    EXECUTABLE,
    FILE,
    SYMLINK,
    CodeError,
    CodeSnapshot,
    Entry,
    blob_hash,
    file_entry,
    machine_id,
    tree_digest,
)

IGNORE_FILE = ".dstackignore"
GIT_TIMEOUT = 120


def _git_env() -> dict[str, str]:
    """git's environment for reading the user's repo: `status` takes no index lock (an IDE's git may hold it)."""
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}


def capture(project: Path, artifact_folders: Callable[[], Iterable[str]] | None = None,
            on_tracked: Callable[[str, int], None] | None = None) -> tuple[CodeSnapshot, dict[str, bytes]]:
    """The snapshot of `project`'s code and the blobs it refers to, by hash. `artifact_folders()`: the project's
    artifact folders (relative to it), called once git has answered (the caller may ask the server meanwhile);
    what git does not track in them is left out. `on_tracked(folder, count)`: for each of them in which git
    tracks files (captured all the same)."""
    project = Path(project).resolve()
    try:
        repo = _read_repo(project)
        if repo is not None and repo.subdir != "." and not any(
                f.startswith(repo.prefix) for f in (*repo.tracked, *repo.untracked)):
            repo = None  # the project's folder is ignored by git: it is a folder of its own
        folders = sorted(set(artifact_folders())) if artifact_folders is not None else []
        if repo is None:
            root, subdir, files = project, ".", walk_folder(project, leave_out=folders)
        else:
            outputs = _Outputs(repo, folders)
            for folder in folders if on_tracked is not None else ():
                if count := outputs.tracked(folder):
                    on_tracked(folder, count)
            if repo.commit and repo.remote_url:
                return _capture_git(repo, outputs)
            root, subdir = repo.top, repo.subdir
            files = sorted(set(repo.tracked + [f for f in repo.untracked if not outputs.holds(f)]))
            ignore = _dstackignore(root, files, also=repo.subdir)
            files = [f for f in files if not ignore.excluded(f)]
        data, entries, size = _tar(root, files)
    except OSError as e:
        raise CodeError(f"cannot read the project's code: {e}") from None
    digest = blob_hash(data)
    snap = CodeSnapshot(mode="archive", subdir=subdir, archive_hash=digest, tree_hash=tree_digest(entries),
                        files=len(entries), size=size)
    if repo is not None:  # informative: the code's version as git sees it
        snap.repo_url, snap.branch, snap.commit, snap.dirty = repo.any_remote_url, repo.branch, repo.commit, repo.dirty
    return snap, {digest: data}


def _capture_git(repo: _Repo, outputs: _Outputs) -> tuple[CodeSnapshot, dict[str, bytes]]:
    # changed files too large for a diff (git tries a binary delta: seconds for tens of MB) travel whole
    heavy = [p for p in repo.changed if _size(repo.top / p) > HEAVY]
    blobs: dict[str, bytes] = {}
    diff = None
    if repo.changed and len(heavy) < len(repo.changed):  # git computes the diff while the files are hashed here
        diff_args = (*_DIFF, ".", *(f":(exclude,literal){p}" for p in heavy))
        diff = _start_git(repo.top, *diff_args)
    try:
        ignore = _dstackignore(repo.top, repo.tracked + repo.untracked, also=repo.subdir)
        whole = [f for f in repo.untracked if not ignore.excluded(f) and not outputs.holds(f)] + heavy
        entries: list[Entry] = []
        size = 0
        files_hash = diff_hash = None
        if whole:
            data, entries, size = _tar(repo.top, whole)
            files_hash = blob_hash(data)
            blobs[files_hash] = data
        done = set(heavy)
        for rel in repo.tracked:
            e = file_entry(repo.top, rel) if rel not in done else None
            if e is not None:
                entries.append(e[0])
                size += e[1]
    except BaseException:
        if diff is not None:
            diff.kill()
            diff.communicate()
        raise
    if diff is not None:
        data = _finish_git(diff, diff_args)
        if data:
            diff_hash = blob_hash(data)
            blobs[diff_hash] = data
    snap = CodeSnapshot(mode="git", repo_url=repo.remote_url, branch=repo.branch, commit=repo.commit, dirty=repo.dirty,
                        subdir=repo.subdir, diff_hash=diff_hash, files_hash=files_hash,
                        tree_hash=tree_digest(entries), files=len(entries), size=size,
                        local_repo=str(repo.top), machine_id=machine_id())
    return snap, blobs


class _Outputs:
    """The project's artifact folders in a git work tree: the untracked files they hold are left out."""

    def __init__(self, repo: _Repo, folders: list[str]) -> None:
        self.repo = repo
        self.paths = {repo.prefix + f for f in folders}

    def tracked(self, folder: str) -> int:
        """How many files git tracks in the project's `folder` (or as it)."""
        path, tracked = self.repo.prefix + folder, self.repo.tracked  # sorted: the folder's files are a range
        count = bisect_left(tracked, path + "0") - bisect_left(tracked, path + "/")  # "0" is the next after "/"
        i = bisect_left(tracked, path)
        return count + (i < len(tracked) and tracked[i] == path)

    def holds(self, rel: str) -> bool:
        """Whether the path (relative to the work tree) is one of the folders or lies in one."""
        if not self.paths:
            return False
        i = rel.find("/")
        while i >= 0:
            if rel[:i] in self.paths:
                return True
            i = rel.find("/", i + 1)
        return rel in self.paths


def _size(path: Path) -> int:
    """The size of a regular file; 0 for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


# staged and unstaged changes against HEAD, as `git apply` reads them whatever the user's diff settings
_DIFF = ("-c", "core.compression=1", "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false",
         "-c", "diff.relative=false", "diff", "--binary", "--no-ext-diff", "--no-textconv", "--no-color",
         "--ignore-submodules=all", "--src-prefix=a/", "--dst-prefix=b/", "HEAD", "--")
HEAVY = 1 << 20


# --- git ---------------------------------------------------------------------------------------------


def _start_git(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["git", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_git_env())


def _finish_git(p: subprocess.Popen, args: tuple[str, ...]) -> bytes:
    try:
        out, err = p.communicate(timeout=GIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise CodeError(f"`git {' '.join(args)}` took more than {GIT_TIMEOUT} s") from None
    if p.returncode != 0:
        raise CodeError(f"`git {' '.join(args)}` failed: {err.decode(errors='replace').strip()}")
    return out


def _git(cwd: Path, *args: str) -> bytes:
    return _finish_git(_start_git(cwd, *args), args)


class _Repo:
    """What git says of the project's repo (a plain class: a dataclass costs milliseconds to import)."""

    def __init__(self, top: Path, prefix: str) -> None:
        self.top = top  # the work tree's root
        self.prefix = prefix  # the project's folder in the work tree: "" or "sub/dir/"
        self.commit: str | None = None
        self.branch: str | None = None
        self.dirty = False
        self.changed: list[str] = []  # tracked files that differ from HEAD (staged or not), relative to top
        self.tracked: list[str] = []  # in the index
        self.untracked: list[str] = []  # not ignored
        self.remote_url: str | None = None  # of a remote that has HEAD; None: the runner could not fetch it
        self.any_remote_url: str | None = None

    @property
    def subdir(self) -> str:
        return self.prefix.rstrip("/") or "."


def _read_repo(project: Path) -> _Repo | None:
    """What git says of the project's repo; None without git or outside a work tree."""
    cmds = {
        "top": ["rev-parse", "--show-toplevel", "--show-prefix"],
        "status": ["status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all", "--ignore-submodules=all"],
        "tracked": ["ls-files", "-z", "--cached", "--full-name", "--", ":/"],
        "config": ["config", "-z", "--list"],
    }
    env = _git_env()
    procs = {}
    try:  # concurrently: each git takes a few ms to start
        for k, a in cmds.items():
            procs[k] = subprocess.Popen(["git", *a], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env=env)
    except OSError:  # no git
        for p in procs.values():
            p.kill()
            p.communicate()
        return None
    out = {}
    for k, p in procs.items():
        try:
            out[k], _ = p.communicate(timeout=GIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise CodeError(f"`git {' '.join(cmds[k])}` took more than {GIT_TIMEOUT} s") from None
        out[k] = out[k] if p.returncode == 0 else None
    if out["top"] is None or out["status"] is None or out["tracked"] is None:
        return None  # not in a work tree (or inside .git)
    top, prefix = (os.fsdecode(out["top"]).split("\n") + [""])[:2]
    repo = _Repo(Path(top), prefix)
    repo.tracked = sorted({os.fsdecode(f) for f in out["tracked"].split(b"\0") if f})
    upstream, ahead = _parse_status(out["status"], repo)
    if repo.commit is None:
        return repo
    config = _parse_config(out["config"] or b"")
    remotes = {k[len("remote."):-len(".url")]: v for k, v in config.items()
               if k.startswith("remote.") and k.endswith(".url")}
    if not remotes:
        return repo
    up_remote = config.get(f"branch.{repo.branch}.remote") if repo.branch and upstream else None
    if up_remote in remotes and ahead == 0:
        name: str | None = up_remote  # HEAD is on its upstream
    else:
        name = _remote_containing_head(repo.top, remotes, preferred=[up_remote, "origin"])
    rewrites = any(k.startswith("url.") for k in config)
    repo.any_remote_url = _remote_url(repo.top, name or (up_remote if up_remote in remotes else None)
                                      or ("origin" if "origin" in remotes else sorted(remotes)[0]), remotes, rewrites)
    if name is not None:
        repo.remote_url = repo.any_remote_url
    return repo


_STATUS_FIELDS = {b"1": 8, b"2": 9, b"u": 10}  # fields before the path in `git status --porcelain=v2`


def _parse_status(data: bytes, repo: _Repo) -> tuple[str | None, int | None]:
    """Fills commit, branch, dirty, changed and untracked from `git status --porcelain=v2 --branch -z`;
    returns the upstream and how many commits HEAD is ahead of it."""
    upstream = ahead = None
    fields = data.split(b"\0")
    i = 0
    while i < len(fields):
        f = fields[i]
        i += 1
        if f.startswith(b"# branch.oid "):
            oid = f[len(b"# branch.oid "):].decode()
            repo.commit = None if oid == "(initial)" else oid
        elif f.startswith(b"# branch.head "):
            head = os.fsdecode(f[len(b"# branch.head "):])
            repo.branch = None if head == "(detached)" else head
        elif f.startswith(b"# branch.upstream "):
            upstream = os.fsdecode(f[len(b"# branch.upstream "):])
        elif f.startswith(b"# branch.ab "):
            ahead = int(f.split()[2])
        elif f.startswith(b"? "):
            path = os.fsdecode(f[2:])
            if not path.endswith("/"):  # "dir/": a nested repository, not captured
                repo.untracked.append(path)
            repo.dirty = True
        elif f[:2] in (b"1 ", b"2 ", b"u "):
            repo.dirty = True
            repo.changed.append(os.fsdecode(f.split(b" ", _STATUS_FIELDS[f[:1]])[-1]))
            if f.startswith(b"2 ") and i < len(fields):  # a rename's original path follows: gone
                repo.changed.append(os.fsdecode(fields[i]))
                i += 1
    repo.untracked.sort()
    return upstream, ahead


def _parse_config(data: bytes) -> dict[str, str]:
    out = {}
    for item in data.split(b"\0"):
        if item:
            k, _, v = os.fsdecode(item).partition("\n")
            out.setdefault(k, v)  # the first of repeated keys: `git remote get-url` reports the first url too
    return out


def _remote_containing_head(top: Path, remotes: dict[str, str], preferred: list[str | None]) -> str | None:
    """A remote with a remote-tracking ref that contains HEAD (the runner can fetch it there)."""
    refs = _git(top, "for-each-ref", "--format=%(refname)", "--contains", "HEAD", "refs/remotes/").decode()
    found = set()
    for ref in refs.split():
        rest = ref[len("refs/remotes/"):]
        names = [n for n in remotes if rest.startswith(n + "/")]
        if names:
            found.add(max(names, key=len))
    for n in preferred:
        if n in found:
            return n
    return sorted(found)[0] if found else None


def _remote_url(top: Path, name: str, remotes: dict[str, str], rewrites: bool) -> str:
    url = _git(top, "remote", "get-url", name).decode().strip() if rewrites else remotes[name]
    colon, slash = url.find(":"), url.find("/")
    if "://" not in url and (colon < 0 or 0 <= slash < colon):  # a local path: as the runner may see it
        url = os.path.normpath(os.path.join(top, url))
    return url


# --- the tar of files --------------------------------------------------------------------------------


class _HashingReader:
    def __init__(self, f) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b


def _tar(root: Path, files: list[str]) -> tuple[bytes, list[Entry], int]:
    """A deterministic gzip'd tar of these files and symlinks (sorted, mode 644 or 755, no times, no owners),
    their tree entries (each file read once) and their size. Missing paths and directories are skipped."""
    buf = io.BytesIO()
    entries: list[Entry] = []
    size = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(set(files)):
            path = os.path.join(root, rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # deleted meanwhile
                continue
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                tar.addfile(info)
                entries.append((rel, SYMLINK, info.linkname))
            elif stat.S_ISREG(st.st_mode):
                executable = bool(st.st_mode & stat.S_IXUSR)
                info.mode, info.size = (0o755 if executable else 0o644), st.st_size
                with open(path, "rb") as f:
                    reader = _HashingReader(f)
                    tar.addfile(info, reader)
                entries.append((rel, EXECUTABLE if executable else FILE, reader.h.hexdigest()))
                size += st.st_size
    return _maybe_gzip(buf.getvalue()), entries, size


def _maybe_gzip(data: bytes, sample: int = 1 << 16, samples: int = 8) -> bytes:
    """gzip'd if that pays: incompressible data (weights, archives) costs seconds per 100 MB to gzip for
    nothing. Judged on a few samples, so the same data always gives the same blob."""
    if len(data) > sample * samples:
        step = len(data) // samples
        probe = b"".join(data[i * step:i * step + sample] for i in range(samples))
        if len(zlib.compress(probe, 1)) > 0.9 * len(probe):
            return data
    return gzip.compress(data, compresslevel=1, mtime=0)


# --- ignore files ------------------------------------------------------------------------------------


class _Rule:
    __slots__ = ("regex", "negate", "dir_only")

    def __init__(self, regex: re.Pattern, negate: bool, dir_only: bool) -> None:
        self.regex, self.negate, self.dir_only = regex, negate, dir_only


def _translate(pat: str) -> str:
    """A gitignore glob (without its leading '/' or trailing '/') as a regex over a relative path."""
    out, i, n = [], 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            start = i
            while i < n and pat[i] == "*":
                i += 1
            if i - start > 1 and (start == 0 or pat[start - 1] == "/"):  # "**" as a whole segment
                if i == n:  # trailing "/**": everything inside
                    out.append(".*")
                    break
                if pat[i] == "/":  # "**/": zero or more folders
                    out.append("(?:.*/)?")
                    i += 1
                    continue
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pat[j] in "!^":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            end = pat.find("]", j)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pat[i + 1:end]
                neg = body[:1] in ("!", "^")
                body = body[1:] if neg else body
                chars = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
                out.append(f"[^/{chars}]" if neg else f"[{chars}]")
                i = end
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pat[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _compile(line: str) -> _Rule | None:
    line = line.rstrip("\r\n")
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    regex = _translate(line.lstrip("/"))
    if not anchored:
        regex = "(?:.*/)?" + regex
    try:
        return _Rule(re.compile(regex, re.DOTALL), negate, dir_only)
    except re.error:
        return None  # as git does with a pattern it cannot read: it matches nothing


class Ignore:
    """The rules of ignore files (gitignore syntax), each applying under its own folder; a file's own
    folder's rules override its parents', and later lines earlier ones. A path under an ignored folder
    is ignored whatever the rules say of it."""

    def __init__(self) -> None:
        self._rules: dict[str, list[_Rule]] = {}  # folder ("" = root, "a/b") -> its rules
        self._dirs: dict[str, bool] = {}

    def add(self, folder: str, text: str) -> None:
        rules = [r for r in map(_compile, text.splitlines()) if r is not None]
        if rules:
            self._rules.setdefault(folder, []).extend(rules)
            self._dirs.clear()

    def matches(self, rel: str, is_dir: bool) -> bool:
        """Whether the rules ignore `rel` itself (its folders are not looked at)."""
        ignored = False
        parts = rel.split("/")
        for k in range(len(parts)):
            folder = "/".join(parts[:k])
            for r in self._rules.get(folder, ()):
                if r.dir_only and not is_dir:
                    continue
                if r.regex.fullmatch("/".join(parts[k:])):
                    ignored = not r.negate
        return ignored

    def excluded(self, rel: str) -> bool:
        """Whether a file is ignored, by itself or by one of its folders."""
        if not self._rules:
            return False
        parts = rel.split("/")
        for k in range(1, len(parts)):
            folder = "/".join(parts[:k])
            hit = self._dirs.get(folder)
            if hit is None:
                hit = self._dirs[folder] = self.matches(folder, True)
            if hit:
                return True
        return self.matches(rel, False)


def _read_text(path: Path) -> str | None:
    try:
        if path.is_file():
            return path.read_text(errors="replace")
    except OSError:
        pass
    return None


def _dstackignore(root: Path, files: list[str], also: str = "") -> Ignore:
    """The .dstackignore files among these files, and the root's and `also`'s even if git ignores them."""
    ignore = Ignore()
    folders = {"", "" if also == "." else also}
    folders |= {f.rpartition("/")[0] for f in files if f.rpartition("/")[2] == IGNORE_FILE}
    for folder in sorted(folders):
        text = _read_text(root / folder / IGNORE_FILE)
        if text:
            ignore.add(folder, text)
    return ignore


def walk_folder(project: Path, leave_out: Collection[str] = ()) -> list[str]:
    """The folder's files and symlinks, without git: .gitignore and .dstackignore files are honoured
    (a path is left out if either ignores it), `.git` is always left out, and so are the paths of `leave_out`
    (relative to the folder) and all they hold."""
    leave_out = set(leave_out)
    gitignore, dstackignore = Ignore(), Ignore()
    out: list[str] = []
    stack = [""]
    while stack:
        folder = stack.pop()
        full = project / folder if folder else project
        for name, ignore in ((".gitignore", gitignore), (IGNORE_FILE, dstackignore)):
            text = _read_text(full / name)
            if text:
                ignore.add(folder, text)
        try:
            with os.scandir(full) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise CodeError(f"cannot read {full}: {e.strerror}") from None
        subdirs = []
        for e in items:
            if e.name == ".git":
                continue
            rel = f"{folder}/{e.name}" if folder else e.name
            is_dir = e.is_dir(follow_symlinks=False)
            if rel in leave_out or gitignore.matches(rel, is_dir) or dstackignore.matches(rel, is_dir):
                continue
            if is_dir:
                subdirs.append(rel)
            elif e.is_symlink() or e.is_file(follow_symlinks=False):
                out.append(rel)
        stack.extend(reversed(subdirs))
    return sorted(out)
