"""Names and paths are one line of printable text, refused where they are made (workflows.yaml at
file:line:column, the API's models), and text from elsewhere (a hostname, a reason, a file's name) is printed
escaped, so that no output can forge a table's row or move the cursor."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from dstack.cli.render import print_run_detail
from dstack.cli.table import print_table
from dstack.core.errors import ConfigError
from dstack.core.models import Job, JobSpec, JobUpdate, Run, RunnerRegistration, RunRequest
from dstack.core.names import BadName, check_runner_name, check_tag, control_character, printable

FORGED = "box\nrunner-2  evil  self-hosted"


@pytest.mark.parametrize("text", ["a\nb", "a\rb", "a\tb", "a\x1b[2Jb", "a\x00b", "a\u202eb", "a\u2028b", "a\x85b"])
def test_control_and_format_characters_are_found_and_escaped(text):
    assert control_character(text) is not None
    shown = printable(text)
    assert shown.isprintable() and shown.startswith("a") and shown.endswith("b"), shown


def test_printable_text_is_left_as_it_is():
    for text in ("lazy-bobcat-1", "été 😀", "a b", "data/out"):
        assert control_character(text) is None and printable(text) == text
    assert control_character("bad\udcffbyte") is None  # not Unicode at all: refused as such elsewhere


@pytest.mark.parametrize("name", ["a/b", "a\nb", "-x", ".", "..", "", "x" * 101, "a b", "a?b"])
def test_a_runner_name_breaking_the_rules_is_refused(name):
    with pytest.raises(BadName):
        check_runner_name(name)


def test_a_runner_name_by_the_rules_is_taken():
    for name in ("lazy-bobcat-1", "gpu_box.lab", "A1"):
        assert check_runner_name(name) == name


@pytest.mark.parametrize("tag", ["", "a:b", "a b", "a\x1bb", "a\u202eb", "t" * 201])
def test_a_tag_breaking_the_rules_is_refused(tag):
    with pytest.raises(BadName) as e:
        check_tag(tag)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)


def test_the_apis_models_apply_the_rules():
    resources = {"cpus": 2, "memory_mib": 1024}
    for bad in ({"name": "x\ny"}, {"name": "a/b"}, {"resources": {"cpus": -5, "memory_mib": 1}},
                {"resources": {"cpus": 1, "memory_mib": -1}}, {"resources": {"cpus": 2**63, "memory_mib": 1}},
                {"hostname": "h" * 301}, {"backend": "lo\ncal"}):
        with pytest.raises(ValidationError):
            RunnerRegistration.model_validate({"hostname": "h", "resources": resources, **bad})
    for bad in ({"workflow": "a\nb"}, {"workflow": ""}, {"tag": "t\x1b"}, {"repo_id": "r" * 501}):
        with pytest.raises(ValidationError):
            RunRequest.model_validate({"repo_id": "r", "workflow": "w", **bad})
    for bad in ({"exit_code": 2**63}, {"ports": [0]}, {"ports": [65536]}, {"artifacts": [{"x": 1}]},
                {"artifacts": [{"path": "a", "manifest": "m", "files": -1}]},
                {"artifacts": [{"path": "a\nb", "manifest": "m"}]}):
        with pytest.raises(ValidationError):
            JobUpdate.model_validate({"status": "DONE", **bad})
    saved = {"path": "data", "manifest": "m", "files": 2, "size": 10}
    assert JobUpdate.model_validate({"status": "DONE", "artifacts": [saved]}).artifacts == [saved]


def test_a_name_with_a_newline_in_workflows_yaml_is_refused_where_it_is_written(project):
    project.workflows('workflows:\n  - name: "train\\nrunner-2"\n    commands: [echo]\n')
    with pytest.raises(ConfigError) as e:
        project.resolve("train")
    assert e.value.location == ".dstack/workflows.yaml:2:11"
    assert e.value.message == "the workflow name 'train\\nrunner-2' holds a control character (\\n)"


@pytest.mark.parametrize(("artifacts", "where"), [
    ('[ok, "data\\u001b[2J"]', ".dstack/workflows.yaml:4:21"),
    ('[{path: "out\\tx"}]', ".dstack/workflows.yaml:4:24"),
    ("[$out]", ".dstack/workflows.yaml:4:17"),  # from a variable
])
def test_an_artifact_path_with_a_control_character_is_refused_at_file_line_column(project, artifacts, where):
    project.workflows(f"workflows:\n  - name: w\n    commands: [echo]\n    artifacts: {artifacts}\n")
    project.variables('variables:\n  w:\n    out: "a\\nb"\n')
    with pytest.raises(ConfigError) as e:
        project.resolve("w")
    assert e.value.location == where and "holds a control character" in e.value.message, (e.value.location, e.value)


def test_a_dependencys_artifact_path_with_a_newline_is_refused(project):
    project.workflows('workflows:\n  - name: w\n    commands: [echo]\n    dependencies:\n'
                      '      - {ref: p, artifacts: ["x\\ny"]}\n')
    with pytest.raises(ConfigError) as e:
        project.resolve("w")
    assert e.value.location == ".dstack/workflows.yaml:5:30" and "'x\\ny'" in e.value.message


def test_a_table_cell_cannot_forge_a_row():
    out = io.StringIO()
    print_table(("RUNNER", "HOST", "BACKEND"), [("runner-1", FORGED, "local")], file=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("runner-1  box\\nrunner-2  evil"), lines


def test_a_runs_details_print_a_reason_escaped(capsys):
    t = datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(job_id="abc", run_name="r-1", workflow="w", status="FAILED", submitted_at=t,
              reason="oops\x1b[2J\x1b[Hall good", runner=FORGED, spec=JobSpec(workflow="w", provider="bash"))
    print_run_detail(Run(run_name="r-1", repo_id="x", workflow="w", provider="bash", status="FAILED",
                         submitted_at=t, jobs=[job]))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "oops\\x1b[2J\\x1b[Hall good" in out
    assert "box\\nrunner-2" in out and "\nrunner-2" not in out
