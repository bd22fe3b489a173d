"""A tagged run is named as `dependencies` name it, `prepare:latest` (or `:latest`), wherever a command takes a run."""

from __future__ import annotations

from tests.e2e.conftest import last_run

WORKFLOWS = """\
workflows:
  - name: prepare
    commands:
      - mkdir -p data && echo rows > data/dataset.txt && echo prepared
    artifacts:
      - data
"""


def test_workflow_tag_names_the_tagged_run(dstack, project, tmp_path):
    root = project(WORKFLOWS)
    dstack("run", "prepare", "-t", "latest", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]

    out = tmp_path / "out"
    r = dstack("artifacts", "download", "prepare:latest", "-o", str(out), cwd=root)
    assert r.returncode == 0, r.stderr
    assert (out / "data" / "dataset.txt").read_text() == "rows\n"

    r = dstack("artifacts", "list", "prepare:latest", cwd=root, check=True)
    assert "data" in r.stdout
    r = dstack("artifacts", "diff", "prepare:latest", name, cwd=root, check=True)
    assert "0 changed, 1 unchanged" in r.stdout
    r = dstack("logs", ":latest", cwd=root, check=True)
    assert r.stdout == "prepared\n"
    r = dstack("status", "prepare:latest", cwd=root, check=True)
    assert name in r.stdout
    r = dstack("tag", "prepare:latest", "best", cwd=root, check=True)
    assert r.stdout.strip() == f"prepare:best -> {name}"


def test_a_tag_on_no_run_is_said(dstack, project, tmp_path):
    root = project(WORKFLOWS)
    dstack("run", "prepare", "-t", "latest", cwd=root, check=True)

    r = dstack("artifacts", "download", "prepare:nope", "-o", str(tmp_path / "out"), cwd=root)
    assert r.returncode == 2
    assert "no run of 'prepare' is tagged 'nope'" in r.stderr
    assert "prepare:latest" in r.stderr  # the tags it has
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()

    r = dstack("logs", "train:latest", cwd=root)
    assert r.returncode == 2
    assert "no run of 'train' is tagged 'latest'" in r.stderr and "dstack tag RUN latest" in r.stderr


def test_artifacts_of_a_run_of_another_project_say_so(dstack, project, tmp_path):
    root = project(WORKFLOWS)
    dstack("run", "prepare", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    other = project("workflows:\n  - name: hi\n    commands: [echo hi]\n", name="other")

    for args in (("list", name), ("download", name, "-o", str(tmp_path / "out")), ("diff", name, name)):
        r = dstack("artifacts", *args, cwd=other, check=True)
        assert f"note: {name} is a run of another project" in r.stderr, (args, r.stderr)
    assert (tmp_path / "out" / "data" / "dataset.txt").is_file()
    assert "another project" not in dstack("artifacts", "list", name, cwd=root, check=True).stderr


def test_reproducing_a_run_of_another_project_says_so(dstack, project):
    root = project(WORKFLOWS)
    dstack("run", "prepare", "-t", "latest", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    other = project("workflows:\n  - name: hi\n    commands: [echo hi]\n", name="other")

    r = dstack("run", "--reproduce", name, "-d", cwd=other, check=True)
    again = last_run(dstack, root)["run_name"]
    assert again != name
    assert f"note: {name} is a run of another project" in r.stderr and f"so is {again}, which reproduces it" in r.stderr
    r = dstack("run", "--reproduce", "prepare:latest", "-d", cwd=root, check=True)  # by its tag, in its project
    assert f"reproduces prepare:latest ({name})" in r.stderr and "another project" not in r.stderr
