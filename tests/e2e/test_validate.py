"""`dstack validate [PATH]`: every workflow checked with no server, every mistake at file:line:column, `N workflows
OK` or exit 2; the pre-commit hook that runs it."""

from __future__ import annotations

import yaml

from tests.e2e.conftest import Dstack

GOOD = """\
workflows:
  - name: prepare
    commands: [echo hi]
    artifacts: [data]
  - name: train
    depends-on: [prepare:latest]
    commands: [python train.py]
    resources:
      v100/gpu: ${{ gpu }}
"""
BAD = """\
workflows:
  - name: ok
    commands: [echo hi]
  - name: typo
    comands: [echo hi]
  - name: bad
    commands: [echo one]
    resources:
      gpu: lots
      cpu: many
  - name: deps
    commands: [echo two]
    depends-on: ["a:::b"]
"""


def test_validate_reports_every_mistake(tmp_path):
    d = Dstack(tmp_path / "home")  # no server is started: none is needed
    project = tmp_path / "p"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text(GOOD)
    ok = d("validate", cwd=project)
    assert ok.returncode == 0 and ok.stdout == "2 workflows OK\n", ok.stdout + ok.stderr
    # the variable no variables.yaml declares: a warning, with what would give it
    assert ".dstack/workflows.yaml:9:17: warning: workflow 'train' uses the variable 'gpu'" in ok.stderr
    assert "`dstack run train --gpu VALUE`" in ok.stderr
    (project / ".dstack" / "variables.yaml").write_text("variables:\n  train:\n    gpu: 1\n")
    assert d("validate", str(project), cwd=tmp_path).stderr == ""

    (project / ".dstack" / "workflows.yaml").write_text(BAD)
    wrong = d("validate", cwd=project)  # variables for a workflow that is gone: said once
    assert wrong.stderr.count("variables.yaml:2:3: error: variables for an unknown workflow 'train'") == 1
    (project / ".dstack" / "variables.yaml").unlink()
    bad = d("validate", cwd=project)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    lines = [line for line in bad.stderr.splitlines() if ": error: " in line]
    assert lines == [
        ".dstack/workflows.yaml:5:5: error: unknown key 'comands' in workflow 'typo'",
        ".dstack/workflows.yaml:9:12: error: 'resources.gpu' in workflow 'bad' must be a GPU count or "
        "{count, name, memory}",
        ".dstack/workflows.yaml:10:12: error: 'resources.cpu' in workflow 'bad' must be a whole number",
        ".dstack/workflows.yaml:13:18: error: dependency 'a:::b' is not 'workflow', 'workflow:tag', ':tag' or a run "
        "name",
    ], bad.stderr
    assert "did you mean 'commands'?" in bad.stderr and bad.stderr.endswith("4 errors in 3 of 4 workflows\n")
    assert bad.stdout == "" and "Traceback" not in bad.stderr

    (project / ".dstack" / "workflows.yaml").write_text("workflows:\n  - name: x\n   commands: [a]\n")
    broken = d("validate", cwd=project)
    assert broken.returncode == 2 and ".dstack/workflows.yaml:3:4: error: malformed YAML" in broken.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    none = d("validate", str(empty), cwd=tmp_path)
    assert none.returncode == 2 and "has no .dstack/workflows.yaml" in none.stderr
    missing = d("validate", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_the_pre_commit_hook_runs_validate(tmp_path):
    from pathlib import Path

    hooks = yaml.safe_load((Path(__file__).parents[2] / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "dstack-validate")
    assert hook["entry"].split()[:2] == ["dstack", "validate"] and hook["pass_filenames"] is False
    project = tmp_path / "p"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text(BAD)
    d = Dstack(tmp_path / "home")
    ran = d(*hook["entry"].split()[1:], cwd=project)  # as pre-commit runs it, from the repository's root
    assert ran.returncode == 2 and ran.stdout == "" and "comands" in ran.stderr
