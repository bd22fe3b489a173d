"""What a new user is told in the first hour (issue 13, points 4, 5 and 7): a resources refusal points at the
workflow's `resources` and says what would fit; what a runner cannot give a job is said, not ignored; where a
job runs is said; a run of another project is said to be one."""

from __future__ import annotations

import re

WORKFLOWS = """\
workflows:
  - name: warmup
    commands: [echo warm]
  - name: big
    commands: [echo never]
    resources:
      v100/gpu: $gpu
  - name: literal
    commands: [echo never]
    resources:
      cpu: 100000
  - name: host
    commands:
      - apt-get --version > /dev/null
      - echo on the host
    resources:
      shm_size: 1GB
      interruptible: true
"""
VARIABLES = """\
variables:
  big:
    gpu: 1
"""


def test_a_refusal_points_at_the_resources_and_says_what_would_fit(dstack, project):
    root = project(WORKFLOWS, VARIABLES)
    dstack("run", "warmup", cwd=root, check=True)  # a live local runner, beside the `local` backend's offer
    r = dstack("run", "big", cwd=root)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(".dstack/workflows.yaml:7:17: error: "), r.stderr  # at `$gpu`
    assert "`dstack run big --gpu 0` fits (`v100/gpu` takes its value from the variable 'gpu')" in r.stderr
    assert "no runner here has a GPU" not in r.stderr  # said once: asking for none is the fix
    # the live runner and the backend that started it are the same machine: said once
    assert re.search(r"runner \S+ and backend local each lack 1 v100 GPU \(has 0 matching\)", r.stderr), r.stderr
    assert "Traceback" not in r.stderr

    typed = dstack("run", "big", "--gpu", "3", cwd=root)
    assert typed.returncode == 2
    assert "(3 v100 GPUs)" in typed.stderr and "--gpu 3 asks for more than any runner has" in typed.stderr

    literal = dstack("run", "literal", cwd=root)
    assert literal.returncode == 2
    assert literal.stderr.startswith(".dstack/workflows.yaml:11:12: error: "), literal.stderr
    assert re.search(r"hint: `cpu: \d+` fits; or add a runner that has it", literal.stderr), literal.stderr
    assert not [r for r in dstack.runs(root) if r["workflow"] in ("big", "literal")]


def test_what_a_host_job_will_not_get_is_said_and_where_it_runs(dstack, project):
    root = project(WORKFLOWS, VARIABLES)
    r = dstack("run", "host", cwd=root)
    assert r.returncode == 0, r.stderr
    assert ".dstack/workflows.yaml:17:17: warning: `shm_size` has no effect: workflow 'host' has no `image`" \
        in r.stderr
    assert (".dstack/workflows.yaml:14:9: warning: workflow 'host' has no `image`, so `apt-get --version > "
            "/dev/null` runs on the runner's host") in r.stderr
    assert (".dstack/workflows.yaml:18:22: warning: 'host' asks for an interruptible (spot) machine, and no runner "
            "or backend here has one") in r.stderr, r.stderr
    assert re.search(r"Run \S+ \(host\) submitted; it runs on the host of a runner \(the workflow has no "
                     r"`image`\)", r.stderr), r.stderr
    as_root = re.search(r"\[dstack: \S+ runs on the host of runner \S+ as root: its commands can change that "
                        r"machine", r.stderr)
    assert as_root is None, r.stderr  # a root runner runs host jobs as nobody (tests/e2e/test_job_user.py)
    assert "on the host" in r.stdout


def test_a_job_in_an_image_says_so(dstack, project, busybox_image):
    root = project(f"workflows:\n  - name: boxed\n    image: {busybox_image}\n    commands: [echo boxed]\n")
    r = dstack("run", "boxed", cwd=root, check=True)
    assert f"submitted; it runs in image {busybox_image}" in r.stderr
    assert "as root" not in r.stderr and "warning" not in r.stderr


def test_a_run_of_another_project_is_said_to_be_one(dstack, project):
    mine = project("workflows:\n  - name: hello\n    commands: [echo hello]\n", name="mine")
    other = project("workflows:\n  - name: hello\n    commands: [echo other]\n", name="other")
    dstack("run", "hello", cwd=other, check=True)
    theirs = dstack.runs(other)[0]["run_name"]
    for command in (["status", theirs], ["logs", theirs]):
        r = dstack(*command, cwd=mine, check=True)
        assert f"note: {theirs} is a run of another project ({other}), not of this one ({mine})" in r.stderr
    same = dstack("status", theirs, cwd=other, check=True)
    assert "another project" not in same.stderr
    tag = dstack("tag", theirs, "v1", cwd=mine)
    assert tag.returncode == 2 and f"{theirs} is a run of another project ({other})" in tag.stderr, tag.stderr


def test_an_empty_image_is_no_image_and_is_said_to_run_on_the_host(dstack, project):
    root = project('workflows:\n  - name: blank\n    image: ""\n    commands: [echo blank]\n')
    r = dstack("run", "blank", cwd=root, check=True)
    assert "it runs on the host of a runner (the workflow has no `image`)" in r.stderr, r.stderr
    assert "runs in image" not in r.stderr and "blank" in r.stdout
