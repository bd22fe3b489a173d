"""Every kind of bad input: one clear error, with file:line:column where it applies, exit code 2, no
traceback, nothing submitted."""

from __future__ import annotations

import time

import pytest

GOOD = """\
workflows:
  - name: prepare
    commands:
      - echo hi
    resources:
      v100/gpu: $gpu
  - name: train
    commands:
      - echo train
    dependencies:
      - prepare:nightly
"""
VARS = """\
variables:
  prepare:
    gpu: 0
"""

CASES = {
    "malformed_yaml": (GOOD.replace("  - name: train", "  - name: [train"), VARS, ["prepare"],
                       ".dstack/workflows.yaml:", "malformed YAML"),
    "unknown_key": (GOOD.replace("    commands:\n      - echo hi", "    comands:\n      - echo hi"), VARS,
                    ["prepare"], ".dstack/workflows.yaml:3:5:", "did you mean 'commands'"),
    "wrong_type": (GOOD.replace("      - echo hi\n", "      - echo hi\n    ports: many\n"), VARS, ["prepare"],
                   ".dstack/workflows.yaml:5:12:", "ports"),
    "unknown_workflow": (GOOD, VARS, ["prepair"], "", "did you mean 'prepare'"),
    "undeclared_variable": (GOOD, VARS, ["prepare", "--gpus", "2"], "", "--gpu"),
    "undefined_reference": (GOOD, "variables:\n  train: {}\n", ["prepare"], ".dstack/workflows.yaml:6:17:",
                            "undefined variable 'gpu'"),
    "missing_tag": (GOOD, VARS, ["train"], ".dstack/workflows.yaml:11:9:", "nightly"),
    "dependency_on_unknown_workflow": (GOOD.replace("prepare:nightly", "prepair"), VARS, ["train"],
                                       ".dstack/workflows.yaml:11:9:",
                                       "the project has no workflow 'prepair'; did you mean 'prepare'?"),
    "unsatisfiable_gpu": (GOOD, VARS, ["prepare", "--gpu", "1"], "", "1 v100 GPU"),
    "bad_variable_value": (GOOD, VARS, ["prepare", "--gpu", "lots"], ".dstack/workflows.yaml:6:",
                           "--gpu lots: 'resources.gpu.count' in workflow 'prepare' takes its value from $gpu, "
                           "and it must be a whole number"),
    "variables_for_unknown_workflow": (GOOD, VARS + "  trian:\n    x: 1\n", ["prepare"],
                                       ".dstack/variables.yaml:4:3:", "did you mean 'train'"),
    "no_workflows_file": (None, None, ["prepare"], "", "dstack init"),
    "a_2022_provider": (GOOD.replace("    commands:\n      - echo hi\n", "    provider: streamlit\n    target: x.py\n"),
                        VARS, ["prepare"], ".dstack/workflows.yaml:3:15:", "not built in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(dstack, project, tmp_path, case):
    workflows, variables, args, where, words = CASES[case]
    root = project(workflows, variables) if workflows is not None else tmp_path
    before = len(dstack.runs(root)) if workflows is not None else 0
    t = time.monotonic()
    r = dstack("run", *args, cwd=root, timeout=60)
    assert time.monotonic() - t < 15, "bad input must fail within seconds, never hang"
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert where in r.stderr and words in r.stderr, r.stderr
    assert "error:" in r.stderr
    if workflows is not None:
        assert len(dstack.runs(root)) == before, "a bad run must not be submitted"


def test_unknown_run_for_status_logs_stop_tag(dstack, project):
    root = project(GOOD, VARS)
    for args in (["status", "nope-nope-1"], ["logs", "nope-nope-1"], ["stop", "nope-nope-1"],
                 ["tag", "nope-nope-1", "x"], ["untag", "nope"]):
        r = dstack(*args, cwd=root)
        assert r.returncode != 0 and "Traceback" not in r.stderr, args
        assert "error:" in r.stderr, (args, r.stderr)


def test_unknown_command_suggests(dstack, tmp_path):
    r = dstack("stauts", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'status'" in r.stderr


def test_yaml_traps_get_advice(dstack, project):
    """A ': ' inside a command (YAML reads it as a mapping) is told to quote the line; a workflows file with no
    workflow says so instead of listing nothing."""
    root = project("workflows:\n  - name: a\n    commands:\n      - echo step: one\n")
    r = dstack("run", "a", cwd=root)
    assert r.returncode == 2, r.stderr
    assert ".dstack/workflows.yaml:4:9:" in r.stderr and "YAML read it as a mapping" in r.stderr, r.stderr
    assert 'quote the line: - "echo step: one"' in r.stderr
    for text in ("", "workflows: []\n"):
        (root / ".dstack" / "workflows.yaml").write_text(text)
        r = dstack("run", cwd=root)
        assert r.returncode == 2 and ".dstack/workflows.yaml: error: the file defines no workflow" in r.stderr, \
            r.stderr



def test_a_run_whose_image_is_missing_says_so_in_its_output_and_its_logs(dstack, project, docker_client):
    """No registry answers here: the pull fails. The job's output says that it pulls, and `dstack logs` of the
    failed run prints why it failed (not nothing)."""
    root = project("workflows:\n  - name: a\n    image: dstack-test/not-here:never\n    commands: [echo a]\n")
    r = dstack("run", "a", cwd=root, timeout=180)
    assert r.returncode != 0
    assert "dstack: pulling image dstack-test/not-here:never (it is not on this machine)" in r.stdout, r.stdout
    name = dstack.runs(root)[0]["run_name"]
    logs = dstack("logs", name, cwd=root, check=True)
    assert f"{name} FAILED: image dstack-test/not-here:never not found locally and could not be pulled" \
        in logs.stderr, logs.stderr
