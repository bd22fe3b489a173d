"""The job sees exactly the code `dstack run` captured: a dirty git repo, a folder without git."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from tests.e2e.conftest import last_run

WORKFLOW = """\
workflows:
  - name: show
    commands:
      - cat tracked.txt untracked.txt
      - test ! -e ignored.log && echo "no ignored file"
      - test -x tool.sh && ./tool.sh
      - od -An -tx1 blob.bin | tr -d ' \\n'; echo
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


def test_a_dirty_repo_is_recreated_for_the_job(dstack, tmp_path):
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(remote))
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "--quiet", "-b", "main")
    (work / ".dstack").mkdir()
    (work / ".dstack" / "workflows.yaml").write_text(textwrap.dedent(WORKFLOW))
    (work / ".gitignore").write_text("*.log\n")
    (work / "tracked.txt").write_text("committed\n")
    (work / "blob.bin").write_bytes(b"\x00\x01")
    (work / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    git(work, "add", "-A")
    git(work, "commit", "--quiet", "-m", "init")
    git(work, "remote", "add", "origin", str(remote))
    git(work, "push", "--quiet", "-u", "origin", "main")
    # uncommitted: a modified file, a new untracked one, an ignored one, a mode change, a binary change
    (work / "tracked.txt").write_text("modified, not committed\n")
    (work / "untracked.txt").write_text("untracked\n")
    (work / "ignored.log").write_text("never sent\n")
    (work / "tool.sh").chmod(0o755)
    (work / "blob.bin").write_bytes(b"\x00\xff\x10")

    r = dstack("run", "show", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "modified, not committed\nuntracked\n" in r.stdout.replace("\r\n", "\n")
    assert "no ignored file" in r.stdout and "tool ran" in r.stdout and "00ff10" in r.stdout
    code = dstack.run_info(work, last_run(dstack, work)["run_name"])["code"]
    assert code["mode"] == "git" and code["repo_url"] == str(remote) and code["dirty"] is True
    assert code["commit"] == git(work, "rev-parse", "HEAD").strip() and code["branch"] == "main"


def test_a_folder_without_git_is_archived(dstack, project):
    root = project(WORKFLOW)
    (root / "tracked.txt").write_text("plain\n")
    (root / "untracked.txt").write_text("folder\n")
    (root / "ignored.log").write_text("x\n")
    (root / ".dstackignore").write_text("*.log\n")
    (root / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    (root / "tool.sh").chmod(0o755)
    (root / "blob.bin").write_bytes(b"\xab")
    r = dstack("run", "show", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "plain\nfolder\n" in r.stdout.replace("\r\n", "\n") and "no ignored file" in r.stdout
    code = last_run(dstack, root)["code"]
    assert code["mode"] == "archive" and code["commit"] is None
