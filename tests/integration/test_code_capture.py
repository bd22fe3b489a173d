"""Code capture against real git and real files: what `dstack run` records of a project is recreated by
the runner byte for byte, for a dirty repo with a remote, a repo without one, a repo without commits and
a folder without git. Trees are compared by an independent walk, not only by the tree hash."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstack.api.code_capture import Ignore, capture, walk_folder
from dstack.core.code import CodeError, CodeSnapshot
from dstack.runner.code import recreate


@pytest.fixture(autouse=True)
def git_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every git here sees only the test's config: an identity, no user or system config, and no repo
    above tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)  # no global excludes file
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.com")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def write(path: Path, data: bytes | str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if executable:
        path.chmod(0o755)


def tree(root: Path) -> dict[str, tuple]:
    """Every file and symlink under root except .git: ("link", target) or ("file", bytes, executable)."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for n in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = ("file", Path(p).read_bytes(), bool(os.stat(p).st_mode & stat.S_IXUSR))
    return out


def roundtrip(project: Path, dest: Path) -> tuple[CodeSnapshot, Path]:
    snap, blobs = capture(project)
    assert set(blobs) == set(snap.blob_hashes())
    snap = CodeSnapshot.from_dict(json.loads(json.dumps({**snap.to_dict(), "later_key": 1})))  # as stored
    return snap, recreate(snap, blobs.__getitem__, dest)


def repo_with_remote(tmp_path: Path) -> tuple[Path, Path]:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(remote))
    work = tmp_path / "work"
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))
    git(work, "remote", "add", "origin", str(remote))
    return work, remote


def commit_all(work: Path, message: str = "commit") -> str:
    git(work, "add", "-A")
    git(work, "commit", "--quiet", "-m", message)
    return git(work, "rev-parse", "HEAD")


def test_dirty_repo_is_recreated_exactly(tmp_path: Path) -> None:
    work, remote = repo_with_remote(tmp_path)
    rnd = random.Random(1)
    write(work / ".gitignore", "*.log\nbuild/\n")
    write(work / ".dstackignore", "scratch/\n*.tmp\n")
    write(work / "tracked.tmp", "tracked: the checkout has it whatever .dstackignore says\n")
    write(work / "a.txt", "one\ntwo\n")
    write(work / "gone.txt", "to be deleted\n")
    write(work / "script.sh", "#!/bin/sh\necho hi\n")
    write(work / "data.bin", rnd.randbytes(50_000))
    write(work / "sub/deep/mod.py", "x = 1\n")
    write(work / "renamed_from.txt", "moving\n" * 100)
    write(work / "crlf.txt", b"windows\r\nlines\r\n")
    write(work / "no_newline.txt", "last line")
    write(work / "dir with space/ünï.txt", "unicode\n")
    write(work / "becomes_link.txt", "a file for now\n")
    write(work / "twice.txt", "v1\n")
    (work / "link").symlink_to("a.txt")
    commit = commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")

    write(work / "a.txt", "one\nTWO\nthree\n")  # modified, unstaged
    write(work / "staged.txt", "new and staged\n")
    git(work, "add", "staged.txt")
    (work / "gone.txt").unlink()
    (work / "script.sh").chmod(0o755)
    data = bytearray((work / "data.bin").read_bytes())
    data[100:200] = rnd.randbytes(100)
    write(work / "data.bin", bytes(data))
    write(work / "sub/deep/mod.py", "x = 2\n")
    git(work, "mv", "renamed_from.txt", "sub/renamed_to.txt")
    write(work / "crlf.txt", b"windows\r\nlines\r\nmore\r\n")
    write(work / "no_newline.txt", "last line, changed")
    write(work / "dir with space/ünï.txt", "ünïcödé\n")
    (work / "becomes_link.txt").unlink()
    (work / "becomes_link.txt").symlink_to("dir with space")
    write(work / "twice.txt", "v2 staged\n")
    git(work, "add", "twice.txt")
    write(work / "twice.txt", "v3 unstaged\n")
    write(work / "new ü\nline.txt", "odd name\n")
    write(work / "untracked.txt", "not added\n")
    write(work / "sub/tool", rnd.randbytes(3000), executable=True)
    write(work / "empty", b"")
    (work / "sub/abs_link").symlink_to("/nonexistent/outside")
    (work / "dir_link").symlink_to("sub")
    write(work / "debug.log", "ignored\n")
    write(work / "build/out.o", "ignored too\n")
    write(work / "scratch/big.bin", "left out by .dstackignore\n")
    write(work / "new.tmp", "left out by .dstackignore\n")

    snap, root = roundtrip(work, tmp_path / "job")

    assert snap.mode == "git"
    assert (snap.repo_url, snap.branch, snap.commit, snap.subdir) == (str(remote), "main", commit, ".")
    assert snap.dirty and snap.diff_hash and snap.files_hash and not snap.archive_hash
    assert root == tmp_path / "job"
    left_out = ("debug.log", "build/out.o", "scratch/big.bin", "new.tmp")
    expected = {k: v for k, v in tree(work).items() if k not in left_out}
    assert "tracked.tmp" in expected
    assert tree(root) == expected
    assert snap.files == len(expected)
    assert git(root, "rev-parse", "HEAD") == commit  # jobs may call git


def test_clean_repo_needs_no_blobs_and_detached_head_works(tmp_path: Path) -> None:
    work, remote = repo_with_remote(tmp_path)
    write(work / "a.txt", "a\n")
    first = commit_all(work)
    write(work / "b.txt", "b\n")
    commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")
    git(work, "checkout", "--quiet", first)

    snap, blobs = capture(work)

    assert (snap.mode, snap.branch, snap.commit, snap.dirty) == ("git", None, first, False)
    assert blobs == {} and snap.blob_hashes() == []
    root = recreate(snap, blobs.__getitem__, tmp_path / "job")
    assert tree(root) == {"a.txt": ("file", b"a\n", False)}


def test_tens_of_mb_of_changes_are_recreated(tmp_path: Path) -> None:
    """A deleted binary and rewritten text files (a diff of tens of MB for `git apply`), and a rewritten
    20 MB binary (too large for a diff: it travels whole)."""
    work = tmp_path / "work"
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))
    rnd = random.Random(2)
    write(work / "weights.bin", rnd.randbytes(20 << 20))
    write(work / "old.bin", rnd.randbytes(8 << 20))
    for i in range(12):
        write(work / f"text/t{i}.csv", "".join(f"{i},{n},{rnd.random()}\n" for n in range(16_000)))
    commit_all(work)
    # as pushed, without paying seconds for packing random bytes: the remote is a clone
    git(tmp_path, "clone", "--quiet", "--bare", str(work), str(tmp_path / "remote.git"))
    git(work, "remote", "add", "origin", str(tmp_path / "remote.git"))
    git(work, "fetch", "--quiet", "origin")
    git(work, "branch", "--quiet", "-u", "origin/main")
    write(work / "weights.bin", rnd.randbytes(20 << 20))
    (work / "old.bin").unlink()
    for i in range(12):
        lines = (work / f"text/t{i}.csv").read_text().splitlines(keepends=True)
        write(work / f"text/t{i}.csv", "".join(ln if n % 2 else f"changed {n}\n" for n, ln in enumerate(lines)))

    snap, blobs = capture(work)
    assert snap.mode == "git" and len(blobs[snap.diff_hash]) > 10 << 20
    assert b"weights.bin" not in blobs[snap.diff_hash] and b"old.bin" in blobs[snap.diff_hash]
    root = recreate(snap, blobs.__getitem__, tmp_path / "job")

    assert tree(root) == tree(work)


def test_project_in_a_subfolder_of_the_repo(tmp_path: Path) -> None:
    work, _ = repo_with_remote(tmp_path)
    write(work / "lib/util.py", "def f(): pass\n")
    write(work / "proj/.dstack/workflows.yaml", "workflows: []\n")
    write(work / "proj/train.py", "print(1)\n")
    commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")
    write(work / "proj/train.py", "print(2)\n")
    write(work / "proj/notes.md", "untracked\n")

    snap, root = roundtrip(work / "proj", tmp_path / "job")

    assert snap.mode == "git" and snap.subdir == "proj"
    assert root == tmp_path / "job" / "proj"
    assert tree(tmp_path / "job") == tree(work)  # the whole work tree: the project may import ../lib
    assert (root / "train.py").read_text() == "print(2)\n"


def test_project_in_a_subfolder_of_a_repo_without_remote(tmp_path: Path) -> None:
    work = tmp_path / "work"
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))
    write(work / "lib/util.py", "def f(): pass\n")
    write(work / "proj/.dstack/workflows.yaml", "workflows: []\n")
    write(work / "proj/.dstackignore", "out/\n")
    write(work / "proj/out/result.bin", "left out\n")
    commit_all(work)

    snap, root = roundtrip(work / "proj", tmp_path / "job")

    assert (snap.mode, snap.subdir) == ("archive", "proj")
    assert root == tmp_path / "job" / "proj"
    assert sorted(tree(tmp_path / "job")) == ["lib/util.py", "proj/.dstack/workflows.yaml", "proj/.dstackignore"]


def test_project_folder_ignored_by_its_repo_is_archived_on_its_own(tmp_path: Path) -> None:
    work, _ = repo_with_remote(tmp_path)
    write(work / ".gitignore", "experiments/\n")
    write(work / "lib.py", "x\n")
    commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")
    write(work / "experiments/e1/.dstack/workflows.yaml", "workflows: []\n")
    write(work / "experiments/e1/train.py", "print(1)\n")

    snap, root = roundtrip(work / "experiments/e1", tmp_path / "job")

    assert (snap.mode, snap.subdir) == ("archive", ".")
    assert sorted(tree(root)) == [".dstack/workflows.yaml", "train.py"]


def test_repo_without_remote_is_archived(tmp_path: Path) -> None:
    work = tmp_path / "work"
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))
    write(work / ".gitignore", "*.log\n")
    write(work / ".dstackignore", "data/\n")
    write(work / "train.py", "print(1)\n")
    write(work / "run.sh", "#!/bin/sh\n", executable=True)
    commit = commit_all(work)
    write(work / "train.py", "print(2)\n")
    write(work / "new.py", "")
    write(work / "x.log", "ignored by git\n")
    write(work / "data/big.bin", b"\0" * 1000)  # ignored by .dstackignore
    (work / "link").symlink_to("train.py")

    snap, root = roundtrip(work, tmp_path / "job")

    assert snap.mode == "archive" and snap.archive_hash and not snap.diff_hash
    assert (snap.repo_url, snap.branch, snap.commit, snap.dirty) == (None, "main", commit, True)
    assert sorted(tree(root)) == [".dstackignore", ".gitignore", "link", "new.py", "run.sh", "train.py"]
    assert tree(root) == {k: v for k, v in tree(work).items() if k in tree(root)}


def test_repo_without_commits_is_archived(tmp_path: Path) -> None:
    work, _ = repo_with_remote(tmp_path)
    write(work / ".gitignore", "secret\n")
    write(work / "a.py", "a\n")
    write(work / "staged.py", "s\n")
    git(work, "add", "staged.py")
    write(work / "secret", "no\n")

    snap, root = roundtrip(work, tmp_path / "job")

    assert snap.mode == "archive" and snap.commit is None
    assert sorted(tree(root)) == [".gitignore", "a.py", "staged.py"]


def test_unpushed_commit_is_archived_with_its_commit(tmp_path: Path) -> None:
    work, remote = repo_with_remote(tmp_path)
    write(work / "a.py", "1\n")
    commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")
    write(work / "a.py", "2\n")
    local = commit_all(work)

    snap, root = roundtrip(work, tmp_path / "job")

    assert (snap.mode, snap.commit, snap.repo_url, snap.branch) == ("archive", local, str(remote), "main")
    assert tree(root) == {"a.py": ("file", b"2\n", False)}


def test_commit_pushed_to_another_branch_is_fetched_from_it(tmp_path: Path) -> None:
    work, _ = repo_with_remote(tmp_path)
    write(work / "a.py", "1\n")
    commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")
    git(work, "checkout", "--quiet", "-b", "feature")
    write(work / "a.py", "2\n")
    commit = commit_all(work)
    git(work, "push", "--quiet", "origin", "feature:wip")  # no upstream; HEAD is on origin/wip

    snap, root = roundtrip(work, tmp_path / "job")

    assert (snap.mode, snap.branch, snap.commit) == ("git", "feature", commit)
    assert (root / "a.py").read_text() == "2\n"


def outputs_roundtrip(project: Path, dest: Path, folders: list[str]) -> tuple[CodeSnapshot, Path, dict[str, int]]:
    """`roundtrip` with these artifact folders; also the folders in which git tracks files, and how many."""
    tracked: dict[str, int] = {}
    snap, blobs = capture(project, lambda: folders, tracked.__setitem__)
    return snap, recreate(snap, blobs.__getitem__, dest), tracked


def downloaded_outputs(root: Path) -> None:
    """Past runs' artifacts in the project (`dstack artifacts download` writes there), a file added to one, and
    code whose names merely start like theirs."""
    write(root / "checkpoint/model.pt", "a past run's checkpoint\n")
    write(root / "checkpoint/extra.txt", "added by hand\n")
    write(root / "checkpoint/sub/deep.bin", b"\0" * 100)
    write(root / "data/rows.csv", "a dependency's artifact, downloaded\n")
    write(root / "checkpointer/x.py", "code\n")
    write(root / "data.py", "code\n")


def test_artifact_folders_are_left_out_in_git_mode_except_what_git_tracks(tmp_path: Path) -> None:
    work, _ = repo_with_remote(tmp_path)
    write(work / "train.py", "print(1)\n")
    write(work / "checkpoint/README.md", "tracked: the commit's, so captured (and said so)\n")
    write(work / "checkpoint/config.json", "{}\n")
    commit_all(work)
    git(work, "push", "--quiet", "-u", "origin", "main")
    downloaded_outputs(work)
    write(work / "checkpoint/config.json", '{"changed": true}\n')  # a tracked change travels in the diff
    write(work / "notes.md", "untracked code\n")

    snap, root, tracked = outputs_roundtrip(work, tmp_path / "job", ["checkpoint", "data"])

    assert snap.mode == "git"
    assert sorted(tree(root)) == ["checkpoint/README.md", "checkpoint/config.json", "checkpointer/x.py",
                                  "data.py", "notes.md", "train.py"]
    assert (root / "checkpoint/config.json").read_text() == '{"changed": true}\n'
    assert tracked == {"checkpoint": 2}
    assert sorted(tree(outputs_roundtrip(work, tmp_path / "all", [])[1])) == sorted(tree(work)), "none: all"


def test_artifact_folders_are_left_out_of_a_repo_without_remote_in_a_subfolder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))
    write(work / "proj/.dstack/workflows.yaml", "workflows: []\n")
    write(work / "proj/checkpoint/.gitkeep", "")
    write(work / "checkpoint/top.txt", "not the project's artifact folder: code\n")
    commit_all(work)
    downloaded_outputs(work / "proj")

    snap, root, tracked = outputs_roundtrip(work / "proj", tmp_path / "job", ["checkpoint", "data"])

    assert (snap.mode, snap.subdir) == ("archive", "proj")
    assert sorted(tree(tmp_path / "job")) == ["checkpoint/top.txt", "proj/.dstack/workflows.yaml",
                                              "proj/checkpoint/.gitkeep", "proj/checkpointer/x.py",
                                              "proj/data.py"]
    assert tracked == {"checkpoint": 1}


def test_artifact_folders_are_left_out_of_a_folder_without_git(tmp_path: Path) -> None:
    make_folder(tmp_path / "proj")
    downloaded_outputs(tmp_path / "proj")
    write(tmp_path / "proj/sub/out/result.txt", "an artifact folder under working_dir sub\n")

    snap, root, tracked = outputs_roundtrip(tmp_path / "proj", tmp_path / "job", ["checkpoint", "data", "sub/out"])

    assert (snap.mode, snap.commit) == ("archive", None)
    assert sorted(tree(root)) == sorted([*FOLDER_FILES, "checkpointer/x.py", "data.py"])
    assert tracked == {}


def make_folder(root: Path) -> None:
    for rel in ["main.py", "run.sh", "empty.txt", "mod.pyc", "keep.pyc", "rooted.txt", "sub/rooted.txt",
                "data/x.csv", "sub/data/y.csv", "sub/cache/c", "a/b/cache/c", "sub/local.tmp", "sub/ok.py",
                "big/weights.bin", "docs/a.md", "docs/b.md", "sp ace.txt", "logs/keep/me.txt", "logs/drop.txt",
                ".git/config"]:
        write(root / rel, rel)
    (root / "run.sh").chmod(0o755)
    write(root / "empty.txt", b"")
    (root / "link").symlink_to("main.py")
    (root / "dangling").symlink_to("../outside/nowhere")
    (root / "emptydir").mkdir()
    write(root / ".gitignore", "# comment\n*.pyc\n!keep.pyc\ndata/\n/rooted.txt\n**/cache\nlogs/*\n!logs/keep/\n")
    write(root / "sub/.gitignore", "*.tmp\n")
    write(root / ".dstackignore", "big/\ndocs/b.md\n")


FOLDER_FILES = [".dstackignore", ".gitignore", "dangling", "docs/a.md", "empty.txt", "keep.pyc", "link",
                "logs/keep/me.txt", "main.py", "run.sh", "sp ace.txt", "sub/.gitignore", "sub/ok.py",
                "sub/rooted.txt"]


def test_folder_without_git_is_archived_honouring_ignore_files(tmp_path: Path) -> None:
    make_folder(tmp_path / "proj")

    snap, root = roundtrip(tmp_path / "proj", tmp_path / "job")

    assert (snap.mode, snap.repo_url, snap.commit) == ("archive", None, None)
    assert sorted(tree(root)) == FOLDER_FILES
    assert tree(root) == {k: v for k, v in tree(tmp_path / "proj").items() if k in FOLDER_FILES}
    assert snap.files == len(FOLDER_FILES)


def test_folder_is_archived_the_same_when_git_is_not_installed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(tmp_path / "proj")
    (tmp_path / "proj/.git/config").unlink()
    git(tmp_path / "proj", "init", "--quiet")  # a repo without commits, then without git to read it
    with_git, _ = capture(tmp_path / "proj")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))

    without_git, _ = capture(tmp_path / "proj")

    assert without_git.mode == "archive" and without_git.tree_hash == with_git.tree_hash


def test_ignore_rules_agree_with_git(tmp_path: Path) -> None:
    """The matcher used without git says what `git ls-files --others --exclude-standard` says."""
    proj = tmp_path / "proj"
    make_folder(proj)
    (proj / ".git/config").unlink()
    git(proj, "init", "--quiet")
    listed = git(proj, "-c", "core.quotePath=false", "ls-files", "--others", "--exclude-standard").splitlines()
    assert sorted(set(listed) - {"big/weights.bin", "docs/b.md"}) == FOLDER_FILES


TREE = ["a/b/c.txt", "a/c.txt", "a/x/b/c.txt", "b/a/c", "c.txt", "ab", "ba.txt", "x/a", "x/y/z/a.txt", "[a]"]
_segment = st.sampled_from(["a", "b", "c.txt", "*", "*.txt", "?", "**", "***", "[ab]", "[!a]*", "[a-c]*", "x", "y",
                           "\\[a]", "*a*", "a?", "#c", "c.txt  ", "\\!b"])
_pattern = st.builds(lambda neg, lead, segs, trail: ("!" if neg else "") + ("/" if lead else "") + "/".join(segs)
                     + ("/" if trail else ""), st.booleans(), st.booleans(), st.lists(_segment, min_size=1, max_size=3),
                     st.booleans())


@pytest.fixture(scope="module")
def ignore_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ignore")
    for rel in TREE:
        write(root / rel, rel)
    git(root, "init", "--quiet")
    return root


@given(st.lists(_pattern, min_size=1, max_size=4), st.lists(_pattern, max_size=2))
def test_ignore_rules_agree_with_git_on_generated_patterns(ignore_repo: Path, top: list[str],
                                                           nested: list[str]) -> None:
    write(ignore_repo / ".gitignore", "\n".join(top) + "\n")
    write(ignore_repo / "a/.gitignore", "\n".join(nested) + "\n")
    listed = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=ignore_repo,
                            check=True, capture_output=True).stdout.decode().split("\0")
    expected = sorted(f for f in listed if f)
    assert walk_folder(ignore_repo) == expected, (top, nested)
    rules = Ignore()  # as .dstackignore files are read in a git repo: over a list of files
    rules.add("", "\n".join(top))
    rules.add("a", "\n".join(nested))
    assert [f for f in sorted([*TREE, ".gitignore", "a/.gitignore"]) if not rules.excluded(f)] == expected


@pytest.mark.parametrize(("pattern", "path", "is_dir", "ignored"), [
    ("*.pyc", "a/b/c.pyc", False, True),
    ("*.pyc", "c.pyc.txt", False, False),
    ("build/", "x/build", True, True),
    ("build/", "build", False, False),
    ("/rooted", "rooted", False, True),
    ("/rooted", "a/rooted", False, False),
    ("a/b", "a/b", False, True),
    ("a/b", "x/a/b", False, False),
    ("**/x", "x", False, True),
    ("**/x", "p/q/x", False, True),
    ("a/**/b", "a/b", False, True),
    ("a/**/b", "a/p/q/b", False, True),
    ("a/**", "a/p/q", False, True),
    ("a/**", "a", True, False),
    ("f?o", "foo", False, True),
    ("f?o", "f/o", False, False),
    ("[ab].txt", "b.txt", False, True),
    ("[!ab].txt", "c.txt", False, True),
    ("[!ab].txt", "a.txt", False, False),
    ("\\#hash", "#hash", False, True),
    ("trailing   ", "trailing", False, True),
    ("*", "anything/at/all", False, True),
])
def test_ignore_pattern(pattern: str, path: str, is_dir: bool, ignored: bool) -> None:
    rules = Ignore()
    rules.add("", pattern)
    assert rules.matches(path, is_dir) is ignored


def test_negation_cannot_reinclude_a_file_of_an_ignored_folder() -> None:
    rules = Ignore()
    rules.add("", "data/\n!data/keep.csv\n*.log\n!important.log\n")
    rules.add("sub", "!*.log\n")
    assert rules.excluded("data/keep.csv")
    assert rules.excluded("x.log") and not rules.excluded("important.log")
    assert not rules.excluded("sub/x.log")


def crafted_tar(*members: tuple[str, str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, value in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
    return buf.getvalue()


@pytest.mark.parametrize("members", [
    [("file", "../escaped", "x")],
    [("file", "ok/../../escaped", "x")],
    [("file", "/tmp/escaped-absolute", "x")],
    [("sym", "link", ".."), ("file", "link/escaped", "x")],
    [("sym", "link", "/"), ("sym", "link/escaped", "x")],
    [("file", ".git/hooks/post-checkout", "#!/bin/sh")],
    [("hard", "hard", "/etc/passwd")],
], ids=["dotdot", "nested-dotdot", "absolute", "through-symlink", "symlink-through-symlink", "git-hook", "hardlink"])
def test_crafted_archive_cannot_write_outside_the_job(tmp_path: Path, members: list) -> None:
    data = crafted_tar(*members)
    h = hashlib.sha256(data).hexdigest()
    snap = CodeSnapshot(mode="archive", archive_hash=h, tree_hash="0" * 64)
    dest = tmp_path / "a" / "job"

    with pytest.raises(CodeError, match="refusing|cannot"):
        recreate(snap, {h: data}.__getitem__, dest)

    assert not (tmp_path / "a" / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/escaped-absolute").exists()


def test_runner_refuses_a_tree_that_differs_or_a_corrupt_blob(tmp_path: Path) -> None:
    write(tmp_path / "proj/a.py", "a\n")
    snap, blobs = capture(tmp_path / "proj")

    with pytest.raises(CodeError, match="the recreated code differs from what was captured"):
        recreate(dataclasses.replace(snap, tree_hash="0" * 64), blobs.__getitem__, tmp_path / "job1")
    with pytest.raises(CodeError, match="corrupted"):
        recreate(snap, lambda h: b"not it", tmp_path / "job2")
