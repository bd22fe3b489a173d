"""DESIGN.md's tour, for real: prepare -> tag -> train reads what prepare wrote; on the host and in Docker."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import Dstack, last_run

HOST_TOUR = """\
workflows:
  - name: prepare
    commands:
      - mkdir -p data
      - echo "rows=$ROWS gpu=$GPU run=$RUN_NAME" > data/dataset.txt
      - cat data/dataset.txt
    artifacts:
      - data
    resources:
      cpu/gpu: $gpu

  - name: train
    commands:
      - cat data/dataset.txt
      - (echo overwritten > data/dataset.txt) 2>/dev/null && echo WROTE || echo "data is read-only"
      - mkdir -p checkpoint && cp data/dataset.txt checkpoint/model.txt
    artifacts:
      - checkpoint
    dependencies:
      - prepare:latest
"""

DOCKER_TOUR = HOST_TOUR.replace("  - name: prepare\n", "  - name: prepare\n    image: {image}\n").replace(
    "  - name: train\n", "  - name: train\n    image: {image}\n")

VARIABLES = """\
variables:
  global:
    rows: 10
  prepare:
    gpu: 0
"""


def _tour(dstack, root):
    r = dstack("run", "prepare", "--rows", "42", cwd=root)
    assert r.returncode == 0, r.stderr
    prepare = last_run(dstack, root)
    assert f"rows=42 gpu=0 run={prepare['run_name']}" in r.stdout
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d+", prepare["run_name"])
    assert prepare["status"] == "DONE"
    job = prepare["jobs"][0]
    assert re.fullmatch(r"[0-9a-f]{12}", job["job_id"])
    assert [(a["path"], a["files"]) for a in job["artifacts"]] == [("data", 1)]

    # no tag yet: a clear error that points at the dependency
    r = dstack("run", "train", cwd=root)
    assert r.returncode == 2
    assert ".dstack/workflows.yaml:" in r.stderr and "latest" in r.stderr and "Traceback" not in r.stderr

    assert dstack("tag", prepare["run_name"], "latest", cwd=root, check=True).stdout.strip() == \
        f"prepare:latest -> {prepare['run_name']}"
    r = dstack("run", "train", cwd=root)
    assert r.returncode == 0, r.stderr
    assert f"rows=42 gpu=0 run={prepare['run_name']}" in r.stdout
    assert "data is read-only" in r.stdout and "WROTE" not in r.stdout
    train = last_run(dstack, root)
    assert train["workflow"] == "train" and train["status"] == "DONE"
    assert train["dependencies"][0]["run_name"] == prepare["run_name"]
    assert train["jobs"][0]["artifacts"][0]["path"] == "checkpoint"
    # times say their zone: UTC in the JSON, the local zone for people
    assert train["submitted_at"].endswith("Z") and train["jobs"][0]["finished_at"].endswith("Z")
    details = dstack("status", train["run_name"], cwd=root, check=True, env={"TZ": "JST-9"}).stdout
    assert " JST" in details

    table = dstack("status", cwd=root, check=True).stdout.splitlines()
    assert table[0].split() == ["RUN", "TAG", "JOB", "WORKFLOW", "VARIABLES", "SUBMITTED", "RUNNER", "STATUS"]
    # newest first: train's run row, its job row, prepare's run row (tagged), its job row
    assert table[1].split()[:3] == [train["run_name"], "<none>", "train"]
    assert table[2].split()[:2] == [train["jobs"][0]["job_id"], "train"]
    assert table[3].split()[:5] == [prepare["run_name"], "latest", "prepare", "--rows", "42"]
    assert table[4].split()[0] == job["job_id"]
    assert all(line.rstrip().endswith("DONE") for line in table[1:5])


def test_tour_on_the_host(dstack, project):
    _tour(dstack, project(HOST_TOUR, VARIABLES))


def test_tour_on_the_host_against_postgresql(tmp_path_factory, project, postgres):
    """The same, with the server's state in PostgreSQL (DSTACK_DATABASE_URL): runs, jobs, artifacts, tags."""
    d = Dstack(tmp_path_factory.mktemp("pg-home"), env={"DSTACK_STOP_GRACE": "2",
                                                         "DSTACK_DATABASE_URL": postgres.database()})
    try:
        _tour(d, project(HOST_TOUR, VARIABLES))
        assert not (d.home / "server" / "dstack.db").exists()  # nothing went to SQLite
    finally:
        d.stop_server()


def test_tour_in_docker(dstack, project, busybox_image):
    root = project(DOCKER_TOUR.format(image=busybox_image), VARIABLES)
    _tour(dstack, root)
    info = dstack.run_info(root, last_run(dstack, root)["run_name"])
    assert info["jobs"][0]["image_digest"].startswith("sha256:")


@pytest.mark.parametrize("image", [False, True])
def test_exit_code_and_reason_of_a_failed_job(dstack, project, busybox_image, image):
    wf = f"""\
    workflows:
      - name: fail
        {"image: " + busybox_image if image else "help: fails"}
        commands:
          - echo before
          - exit 3
          - echo never
    """
    root = project(wf)
    r = dstack("run", "fail", cwd=root)
    assert r.returncode == 3
    assert "before" in r.stdout and "never" not in r.stdout
    assert "FAILED" in r.stderr and "exited with code 3" in r.stderr
    run = last_run(dstack, root)
    assert run["status"] == "FAILED" and run["jobs"][0]["exit_code"] == 3
    status = dstack("status", cwd=root, check=True).stdout
    assert "FAILED (exit 3)" in status


def test_logs_keep_carriage_returns(dstack, project):
    root = project("""\
    workflows:
      - name: bar
        commands:
          - printf 'progress 1\\rprogress 2\\rdone\\n'
    """)
    r = dstack("run", "bar", cwd=root, binary=True)
    assert r.returncode == 0
    assert b"progress 1\rprogress 2\rdone" in r.stdout
    name = last_run(dstack, root)["run_name"]
    assert b"progress 1\rprogress 2\rdone" in dstack("logs", name, cwd=root, check=True, binary=True).stdout


def test_detach_then_logs_follow(dstack, project):
    root = project("""\
    workflows:
      - name: slow
        commands:
          - echo start
          - sleep 1
          - echo end
    """)
    r = dstack("run", "slow", "-d", cwd=root, check=True)
    name = re.search(r"Run (\S+)", r.stderr).group(1)
    r = dstack("logs", name, "-f", cwd=root)
    assert r.returncode == 0 and "start" in r.stdout and "end" in r.stdout
    assert dstack.run_info(root, name)["status"] == "DONE"


def test_variables_reach_the_job_with_their_types(dstack, project):
    root = project("""\
    workflows:
      - name: vars
        commands:
          - echo "lr=$LR epochs=$EPOCHS name=${{ run_name }} args=$variables_as_args"
    """, """\
    variables:
      vars:
        lr: 0.01
        epochs: 3
    """)
    r = dstack("run", "vars", "--epochs", "5", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    assert f"lr=0.01 epochs=5 name={name} args=--lr 0.01 --epochs 5" in r.stdout
    assert last_run(dstack, root)["variables"] == {"lr": 0.01, "epochs": 5}


def test_init_writes_an_example_that_runs(dstack, tmp_path):
    r = dstack("init", cwd=tmp_path, check=True)
    assert "wrote .dstack/workflows.yaml" in r.stdout
    assert "kept" in dstack("init", cwd=tmp_path, check=True).stdout
    assert dstack("run", "prepare", cwd=tmp_path).returncode == 0


def test_ports_are_picked_exported_and_printed(dstack, project):
    root = project("""\
    workflows:
      - name: app
        ports: 2
        commands:
          - echo "ports $PORT_0 $PORT_1"
          - sleep 1
    """)
    r = dstack("run", "app", cwd=root, check=True)
    first, second = re.search(r"ports (\d+) (\d+)", r.stdout).groups()
    assert first != second
    assert f"PORT_0: http://127.0.0.1:{first}" in r.stderr and f"PORT_1: http://127.0.0.1:{second}" in r.stderr
    assert last_run(dstack, root)["jobs"][0]["ports"] == [int(first), int(second)]


def test_an_artifact_the_job_never_created_is_reported_in_its_logs(dstack, project):
    root = project("""\
    workflows:
      - name: lazy
        commands: [echo nothing]
        artifacts: [model]
    """)
    r = dstack("run", "lazy", cwd=root, check=True)
    assert "dstack: artifact 'model' was not created by the job" in r.stdout
    assert [(a["path"], a["files"], a["size"]) for a in last_run(dstack, root)["jobs"][0]["artifacts"]] == [("model", 0, 0)]


def test_a_failed_job_that_never_created_its_artifact_leaves_none(dstack, project):
    """No empty artifact passes for the output of a job that failed before it made the folder."""
    root = project("""\
    workflows:
      - name: broken
        commands: [echo trying, exit 3]
        artifacts: [model]
    """)
    r = dstack("run", "broken", cwd=root)
    assert r.returncode == 3
    assert "dstack: artifact 'model' was not created by the job: nothing saved" in r.stdout
    job = last_run(dstack, root)["jobs"][0]
    assert job["status"] == "FAILED" and job["artifacts"] == []


def test_reproduce_reruns_with_the_same_inputs_and_lineage_is_recorded(dstack, project):
    root = project(HOST_TOUR, VARIABLES)
    dstack("run", "prepare", "--rows", "7", "-t", "latest", cwd=root, check=True)
    first = last_run(dstack, root)["run_name"]
    dstack("run", "train", cwd=root, check=True)
    train = last_run(dstack, root)["run_name"]
    dstack("run", "prepare", "--rows", "8", "-t", "latest", cwd=root, check=True)  # the tag moves on

    r = dstack("run", "--reproduce", train, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "rows=7" in r.stdout  # the same prepare run as then, not what `latest` is now
    again = dstack.run_info(root, last_run(dstack, root)["run_name"])
    assert again["reproduces"] == train and again["variables"] == dstack.run_info(root, train)["variables"]
    assert again["dependencies"][0]["run_name"] == first
    assert again["code"] == dstack.run_info(root, train)["code"]

    used = dstack.run_info(root, first)
    assert used["used_by"] == sorted([train, again["run_name"]])
    detail = dstack("status", first, cwd=root, check=True).stdout
    assert "Used by" in detail and train in detail
    detail = dstack("status", train, cwd=root, check=True).stdout
    assert f"prepare:latest -> {first}" in detail and "runner" in detail and "CPU" in detail

    r = dstack("run", "train", "--reproduce", train, cwd=root)
    assert r.returncode == 2 and "takes no workflow" in r.stderr


def test_a_job_too_short_to_be_reported_running_records_its_image_and_ports(dstack, project, busybox_image):
    root = project(f"workflows:\n  - name: blink\n    image: {busybox_image}\n    ports: 1\n    commands: [\"true\"]\n")
    for _ in range(2):  # in a container made for it, then in the one warmed after it
        dstack("run", "blink", cwd=root, check=True)
        job = dstack.run_info(root, last_run(dstack, root)["run_name"])["jobs"][0]
        assert job["status"] == "DONE" and job["image_digest"].startswith("sha256:") and len(job["ports"]) == 1


def test_the_outcome_starts_a_line_of_its_own_after_output_without_a_last_newline(dstack, project):
    root = project("""\
    workflows:
      - name: bare
        commands: [printf 'no newline']
      - name: ended
        commands: [echo with newline]
    """)
    r = dstack("run", "bare", cwd=root, check=True)
    assert r.stdout.endswith("no newline")
    name = last_run(dstack, root)["run_name"]
    assert f"\n\n{name} DONE" in r.stderr, repr(r.stderr)  # a newline first: on a terminal, after the output
    r = dstack("run", "ended", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    assert f"\n{name} DONE" in r.stderr and f"\n\n{name} DONE" not in r.stderr, repr(r.stderr)


def test_sizes_and_counts_are_written_one_way(dstack, project):
    """`dstack status RUN` writes an artifact's size as every size is written (1.5 KB), and one file as one."""
    root = project("""\
    workflows:
      - name: one
        commands: [mkdir -p out, "head -c 1536 /dev/zero > out/a.bin"]
        artifacts: [out]
    """)
    dstack("run", "one", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    shown = dstack("status", name, cwd=root, check=True).stdout
    assert "out (1 file, 1.5 KB)" in shown, shown
    assert "1 files" not in shown and "bytes" not in shown


@pytest.mark.parametrize("image", [False, True], ids=["host", "docker"])
def test_output_arrives_as_the_job_wrote_it(dstack, project, busybox_image, image):
    """\\n line ends (not the terminal's \\r\\n), a progress bar's \\r kept, the job's own \\r\\n kept: in the
    attached stream and in `dstack logs`."""
    root = project(f"""\
    workflows:
      - name: lines
        {"image: " + busybox_image if image else ""}
        commands:
          - echo one
          - printf 'step 1\\rstep 2\\r\\n'
          - printf 'dos\\r\\n'
          - echo x
    """)
    r = dstack("run", "lines", cwd=root, binary=True, check=True)
    want = b"one\nstep 1\rstep 2\r\ndos\r\nx\n"
    assert r.stdout == want, r.stdout
    name = last_run(dstack, root)["run_name"]
    assert dstack("logs", name, cwd=root, binary=True, check=True).stdout == want
