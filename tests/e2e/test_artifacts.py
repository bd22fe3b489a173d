"""Artifacts end to end: list, download (resumed), diff, prune; dependencies mounted without copies;
the S3 store."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from tests.e2e.conftest import Dstack, last_run
from tests.integration.s3_server import moto_s3, s3_config  # noqa: F401  (fixtures)

WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - mkdir -p out/sub empty-dir-holder
      - head -c 300000 /dev/urandom > out/big.bin
      - echo "$NOTE" > out/sub/note.txt
      - printf '#!/bin/sh\\necho run me\\n' > out/tool.sh && chmod +x out/tool.sh
      - ln -s sub/note.txt out/link
    artifacts: [out]
  - name: use
    {image}
    dependencies: [make:latest]
    commands:
      - ls -i out/big.bin | cut -d' ' -f1
      - ./out/tool.sh
      - cat out/link
"""
VARIABLES = "variables:\n  make:\n    note: first\n"


def _runs(dstack, root):
    return [r["run_name"] for r in dstack.runs(root)]


def test_list_download_resume_and_diff(dstack, project, tmp_path):
    root = project(WORKFLOWS.format(image=""), VARIABLES)
    dstack("run", "make", cwd=root, check=True)
    first = last_run(dstack, root)["run_name"]
    dstack("run", "make", "--note", "second", cwd=root, check=True)
    second = last_run(dstack, root)["run_name"]

    listed = json.loads(dstack("artifacts", "list", first, "--json", cwd=root, check=True).stdout)
    assert [(a["path"], a["files"]) for a in listed] == [("out", 3)]
    assert len(listed[0]["manifest"]) == 64
    table = dstack("artifacts", "list", first, "--files", cwd=root, check=True).stdout
    assert "big.bin" in table and "link  -> sub/note.txt" in table and "755" in table

    out = tmp_path / "dl"
    r = dstack("artifacts", "download", first, "-o", str(out), cwd=root, check=True)
    assert "3 files" in r.stdout
    assert (out / "out" / "sub" / "note.txt").read_text() == "first\n"
    assert os.readlink(out / "out" / "link") == "sub/note.txt"
    assert os.access(out / "out" / "tool.sh", os.X_OK)  # executable bits survive
    big = (out / "out" / "big.bin").read_bytes()

    # resume: a cut download (a partial file) is completed, not restarted; a complete file is skipped
    (out / "out" / "big.bin").unlink()
    (out / "out" / "big.bin.dstack-part").write_bytes(big[:100000])
    r = dstack("artifacts", "download", first, "-o", str(out), cwd=root, check=True)
    assert "(2 already there)" in r.stdout
    assert (out / "out" / "big.bin").read_bytes() == big
    assert not (out / "out" / "big.bin.dstack-part").exists()
    # a corrupt partial file is detected by its hash, never kept
    (out / "out" / "big.bin").unlink()
    (out / "out" / "big.bin.dstack-part").write_bytes(b"x" * 1000)
    r = dstack("artifacts", "download", first, "-o", str(out), cwd=root)
    assert r.returncode == 1 and "does not match its hash" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "out" / "big.bin").exists()
    dstack("artifacts", "download", first, "-o", str(out), cwd=root, check=True)
    assert (out / "out" / "big.bin").read_bytes() == big

    one = tmp_path / "one"
    dstack("artifacts", "download", first, "out/sub", "-o", str(one), cwd=root, check=True)
    assert sorted(p.name for p in one.rglob("*") if p.is_file()) == ["note.txt"]
    r = dstack("artifacts", "download", first, "nope", "-o", str(one), cwd=root)
    assert r.returncode == 2 and "nothing at 'nope'" in r.stderr
    r = dstack("artifacts", "download", first, "sub/note.txt", "-o", str(one), cwd=root)  # without its artifact
    assert r.returncode == 2 and "did you mean 'out/sub/note.txt'? PATH starts with the artifact's folder" in r.stderr

    diff = json.loads(dstack("artifacts", "diff", first, second, "--json", cwd=root, check=True).stdout)
    assert diff["changed"] == ["out/big.bin", "out/sub/note.txt"] and diff["added"] == diff["removed"] == []
    assert diff["unchanged"] == 2  # tool.sh and the link
    assert "2 changed" in dstack("artifacts", "diff", first, second, cwd=root, check=True).stdout


@pytest.mark.parametrize("image", [False, True])
def test_a_dependency_is_mounted_without_copying(dstack, project, busybox_image, image):
    root = project(WORKFLOWS.format(image=f"image: {busybox_image}" if image else ""), VARIABLES)
    dstack("run", "make", "-t", "latest", cwd=root, check=True)
    made = last_run(dstack, root)
    r = dstack("run", "use", cwd=root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.replace("\r\n", "\n").splitlines()
    assert "run me" in lines and "first" in lines
    # the job's file is the store's blob itself (a hard link), not a copy
    manifest = json.loads(dstack("artifacts", "list", made["run_name"], "--files", "--json", cwd=root,
                                 check=True).stdout)[0]
    blob_hash = next(e["hash"] for e in manifest["entries"] if e["path"] == "big.bin")
    blob = dstack.home / "storage" / "blobs" / blob_hash[:2] / blob_hash
    assert int(lines[0]) == os.stat(blob).st_ino


def test_prune_keeps_tagged_runs_and_what_they_consumed(dstack, project):
    root = project(WORKFLOWS.format(image=""), VARIABLES)
    dstack("run", "make", "-t", "latest", cwd=root, check=True)
    consumed = last_run(dstack, root)["run_name"]
    dstack("run", "use", "-t", "keep", cwd=root, check=True)
    kept = last_run(dstack, root)["run_name"]
    dstack("untag", "make:latest", cwd=root, check=True)  # `consumed` is kept only as kept's input
    (root / "changed.txt").write_text("the junk run's code differs\n")
    dstack("run", "make", "--note", "junk", cwd=root, check=True)
    junk = last_run(dstack, root)["run_name"]
    blobs_before = sum(1 for _ in (dstack.home / "storage" / "blobs").rglob("*") if _.is_file())

    dry = json.loads(dstack("prune", "--dry-run", "--json", cwd=root, check=True).stdout)
    assert dry["runs"] == [junk] and dry["manifests"] == 1 and dry["blobs"] == 2
    assert dry["code_blobs"] == 0  # a code snapshot younger than 5 minutes is spared (it may be in flight)
    for blob in (dstack.home / "server" / "code").iterdir():  # ... so let them all be an hour old
        os.utime(blob, (time.time() - 3600, time.time() - 3600))
    dry = json.loads(dstack("prune", "--dry-run", "--json", cwd=root, check=True).stdout)
    assert dry["code_blobs"] == 1  # the junk run's code, which no other run of any project shares
    assert set(_runs(dstack, root)) == {consumed, kept, junk}  # nothing went

    r = dstack("prune", cwd=root, check=True)
    assert f"deleted 1 run: {junk}" in r.stdout
    assert set(_runs(dstack, root)) == {consumed, kept}
    blobs_after = sum(1 for _ in (dstack.home / "storage" / "blobs").rglob("*") if _.is_file())
    assert blobs_after == blobs_before - 2  # its random file and its note; the tool script is shared
    # what remains is whole: the kept run's input can still be reproduced
    assert dstack("run", "--reproduce", kept, cwd=root).returncode == 0


def test_the_tour_with_an_s3_store(tmp_path, project, s3_config):  # noqa: F811
    env = {"DSTACK_STORE_URL": f"s3://{s3_config['bucket']}/{s3_config['prefix']}?region=us-east-1"
                               f"&endpoint_url={s3_config['endpoint_url']}",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    d = Dstack(tmp_path / "home", env=env)
    try:
        root = project(WORKFLOWS.format(image=""), VARIABLES)
        d("run", "make", "-t", "latest", cwd=root, check=True)
        r = d("run", "use", cwd=root)
        assert r.returncode == 0, r.stderr
        assert "run me" in r.stdout and "first" in r.stdout
        s3 = boto3.client("s3", endpoint_url=s3_config["endpoint_url"], region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_config["bucket"])["Contents"]]
        assert any("/blobs/" in k for k in keys) and any("/manifests/" in k for k in keys)
        assert not (d.home / "storage" / "blobs").exists()  # nothing went to the local folder
        # its local runners hold no credentials (none in their environment): they used presigned URLs
        logs = "".join(p.read_text() for p in (d.home / "runners").glob("*/runner.log"))
        assert "artifact store: through the server (presigned URLs of its S3 store)" in logs, logs
        out = tmp_path / "dl"
        d("artifacts", "download", last_run(d, root)["dependencies"][0]["run_name"], "-o", str(out), cwd=root,
          check=True)
        assert (out / "out" / "sub" / "note.txt").read_text() == "first\n"
    finally:
        d.stop_server()


def test_a_symlink_out_of_an_artifact_is_left_out_and_reported(dstack, project):
    root = project("""\
    workflows:
      - name: sneaky
        commands:
          - mkdir -p out && ln -s /etc/passwd out/passwd && echo kept > out/file
        artifacts: [out]
    """)
    r = dstack("run", "sneaky", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "symlink 'passwd' left out (the rest is saved): it points outside the artifact (to '/etc/passwd')" in r.stdout
    run = last_run(dstack, root)
    files = json.loads(dstack("artifacts", "list", run["run_name"], "--files", "--json", cwd=root,
                              check=True).stdout)[0]["entries"]
    assert [e["path"] for e in files] == ["file"]


def test_a_file_declared_as_an_artifact_fails_the_job_loudly(dstack, project):
    root = project("""\
    workflows:
      - name: filer
        commands: [mkdir -p out, echo weights > model.pt, echo x > out/x]
        artifacts: [model.pt, out]
    """)
    r = dstack("run", "filer", cwd=root)
    assert r.returncode == 1
    assert "artifact 'model.pt' is a file, not a folder" in r.stdout
    assert "artifacts are folders" in r.stderr
    job = last_run(dstack, root)["jobs"][0]
    assert job["status"] == "FAILED" and [a["path"] for a in job["artifacts"]] == ["out"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


def test_a_dependency_is_never_mounted_through_a_symlink_of_the_code(dstack, project, tmp_path):
    root = project(WORKFLOWS.format(image=""), VARIABLES)
    dstack("run", "make", "-t", "latest", cwd=root, check=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "out").symlink_to(outside)  # the code's `out` leads outside the job's folder
    git(root, "init", "--quiet")  # committed (untracked, an artifact folder is not code: it would not travel)
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "a link")
    r = dstack("run", "use", cwd=root)
    assert r.returncode == 1 and "leads outside the job's folder" in r.stderr
    assert list(outside.iterdir()) == []


def test_dependency_forms_and_a_subset_of_artifacts(dstack, project):
    root = project("""\
    workflows:
      - name: two
        commands: [mkdir -p a b, echo A > a/f, echo B > b/f]
        artifacts: [a, b]
      - name: by-workflow
        dependencies: [two]
        commands: [cat a/f b/f]
      - name: subset
        dependencies:
          - ref: two
            artifacts: [b]
        commands: [cat b/f, test ! -e a && echo "no a"]
      - name: by-run
        dependencies: [RUN]
        commands: [cat a/f]
    """)
    dstack("run", "two", cwd=root, check=True)
    two = last_run(dstack, root)["run_name"]
    r = dstack("run", "by-workflow", cwd=root, check=True)  # `two` = its latest DONE run, no tag needed
    assert "A" in r.stdout and "B" in r.stdout
    r = dstack("run", "subset", cwd=root, check=True)
    assert "B" in r.stdout and "no a" in r.stdout
    deps = last_run(dstack, root)["dependencies"]
    assert deps[0]["artifacts"] == ["b"] and list(deps[0]["manifests"]) == ["b"]
    (root / ".dstack" / "workflows.yaml").write_text((root / ".dstack" / "workflows.yaml").read_text()
                                                     .replace("RUN", two))
    assert "A" in dstack("run", "by-run", cwd=root, check=True).stdout


def planted_manifest(listed: list[dict], path: str) -> str:
    return next(a["manifest"] for a in listed if a["path"] == path)


def test_saved_outputs_become_blobs_and_trees_without_copies_nested_artifacts_too(dstack, project):
    """A finished job's files become the store's blobs (hard links) and its artifact folder becomes
    the tree that dependents mount; artifacts that nest (or repeat) are saved whole all the same."""
    root = project("""\
    workflows:
      - name: nest
        commands:
          - mkdir -p out/sub solo
          - head -c 200000 /dev/urandom > out/top.bin
          - echo inner > out/sub/inner.txt
          - echo solo > solo/s.txt
        artifacts: [out, out/sub, ./solo, solo]
      - name: read
        dependencies: [nest]
        commands: [cat out/sub/inner.txt solo/s.txt, ls out]
    """)
    dstack("run", "nest", cwd=root, check=True)
    made = last_run(dstack, root)["run_name"]
    listed = json.loads(dstack("artifacts", "list", made, "--files", "--json", cwd=root, check=True).stdout)
    files = {a["path"]: sorted(e["path"] for e in a["entries"] if e["kind"] == "file") for a in listed}
    assert files == {"out": ["sub/inner.txt", "top.bin"], "out/sub": ["inner.txt"], "solo": ["s.txt"]}
    trees = dstack.home / "storage" / "trees"
    planted = {a["path"]: (trees / a["manifest"]).is_dir() for a in listed}
    assert planted == {"out": False, "out/sub": False, "solo": True}  # nested ones are built when mounted
    tree_file = trees / planted_manifest(listed, "solo") / "s.txt"
    h = next(e["hash"] for e in listed[2]["entries"] if e["path"] == "s.txt")
    assert os.stat(tree_file).st_ino == os.stat(dstack.home / "storage" / "blobs" / h[:2] / h).st_ino
    r = dstack("run", "read", cwd=root, check=True)
    out = r.stdout.replace("\r\n", "\n")
    assert "inner\nsolo\n" in out and "top.bin" in out


TOUR = """\
workflows:
  - name: prepare
    commands: [mkdir -p data, echo "1,2" > data/rows.csv]
    artifacts: [data]
  - name: train
    dependencies: [prepare:latest]
    commands: [ls data, mkdir -p checkpoint, cp data/rows.csv checkpoint/model.txt]
    artifacts: [checkpoint]
"""


def _saved(dstack, root: Path, run_name: str) -> list[str]:
    listed = json.loads(dstack("artifacts", "list", run_name, "--files", "--json", cwd=root, check=True).stdout)
    return sorted(f"{a['path']}/{e['path']}" for a in listed for e in a["entries"] if e["kind"] == "file")


def test_artifacts_downloaded_into_the_project_are_not_code_of_the_next_run(dstack, project):
    """Artifact folders are outputs, never code: a past run's artifacts downloaded into the project (where
    `dstack artifacts download` writes by default), with a file added to them, neither travel into the next
    run's artifact nor are shipped where the dependency is mounted."""
    root = project(TOUR)
    dstack("run", "prepare", "-t", "latest", cwd=root, check=True)
    prepared = last_run(dstack, root)["run_name"]
    dstack("run", "train", cwd=root, check=True)
    trained = last_run(dstack, root)["run_name"]
    dstack("artifacts", "download", trained, cwd=root, check=True)
    dstack("artifacts", "download", prepared, cwd=root, check=True)
    assert (root / "checkpoint" / "model.txt").is_file() and (root / "data" / "rows.csv").is_file()
    (root / "checkpoint" / "extra.txt").write_text("added by hand\n")
    (root / "data" / "stale.csv").write_text("a local copy\n")

    r = dstack("run", "train", cwd=root)

    assert r.returncode == 0, r.stderr
    assert "rows.csv" in r.stdout and "stale.csv" not in r.stdout
    again = last_run(dstack, root)
    assert _saved(dstack, root, again["run_name"]) == ["checkpoint/model.txt"]
    assert again["code"]["files"] == 1  # .dstack/workflows.yaml: nothing of checkpoint/ or data/


def test_files_git_tracks_in_an_artifact_folder_are_code_and_said_to_be_saved(dstack, project):
    root = project(TOUR)
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "README.md").write_text("what the checkpoints are\n")
    git(root, "init", "--quiet")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "init")
    dstack("run", "prepare", "-t", "latest", cwd=root, check=True)
    (root / "checkpoint" / "stale.txt").write_text("untracked: left out\n")

    r = dstack("run", "train", cwd=root)

    assert r.returncode == 0, r.stderr
    assert ("warning: git tracks 1 file in checkpoint/, an artifact folder of 'train': tracked files are code, so "
            "they travel with the run and are saved in its artifact with what the job writes") in r.stderr
    assert _saved(dstack, root, last_run(dstack, root)["run_name"]) == ["checkpoint/README.md",
                                                                         "checkpoint/model.txt"]
    assert "warning" not in dstack("run", "prepare", cwd=root, check=True).stderr  # prepare saves data/ only
