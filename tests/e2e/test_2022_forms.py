"""Workflow files as researchers wrote them in 2022 (shared/REFERENCE-2022.md, section 2), read unchanged:
`deps` and `depends-on` in all their forms, artifacts as `{path, mount}`, `env` as a list, `gpu` by name alone,
`gpu: 0`, `interruptible: false`, `${{ run.args }}`; and the keys no form has any more, refused saying so."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dstack.config.files import ProjectFiles
from dstack.config.workflows import command_line, resolve_workflow, validate_project

FILE = """\
workflows:
  - name: download
    provider: bash
    commands: [mkdir -p data, echo x > data/x]
    artifacts:
      - path: ./data
        mount: true
  - name: deps-b
    provider: bash
    deps:
      - tag: mnist_data
      - workflow: download
    commands: [echo hi]
  - name: deps-strings
    provider: bash
    deps: [":mnist", "download"]
    commands: [echo hi]
  - name: early
    depends-on:
      repo:
        include: [data/]
      workflows: [download, "prepare:v0.0.2"]
    image: python:3.10
    commands: [echo hi]
  - name: res
    provider: bash
    commands: [echo hi]
    resources:
      gpu:
        name: V100
      interruptible: false
      local: true
  - name: nogpu
    provider: bash
    commands: [echo hi]
    resources:
      gpu: 0
  - name: args
    provider: bash
    commands:
      - echo train ${{ run.args }}
  - name: env-list
    provider: bash
    env: [A=1, B]
    commands: [echo $A]
"""


def _files(tmp_path: Path, text: str) -> ProjectFiles:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text(textwrap.dedent(text))
    return ProjectFiles.read(tmp_path)


def test_2022_files_are_read_unchanged(tmp_path):
    files = _files(tmp_path, FILE)
    found = validate_project(files)
    assert found.errors == [] and found.workflows == 8, [e.message for e in found.errors]

    def resolved(name: str, args: list[str] = ()):
        overrides, run_args = command_line(files, name, list(args))
        return resolve_workflow(files, name, overrides, "r-1", run_args=run_args)

    assert [d.ref for d in resolved("deps-b").dependencies] == [":mnist_data", "download"]
    assert [d.ref for d in resolved("deps-strings").dependencies] == [":mnist", "download"]
    assert [d.ref for d in resolved("early").dependencies] == ["download", "prepare:v0.0.2"]
    assert resolved("download").jobs[0].artifacts == ["data"]
    gpu = resolved("res").jobs[0].requirements.gpu
    assert (gpu.name, gpu.count) == ("V100", 1)
    assert not resolved("nogpu").jobs[0].requirements.gpu or resolved("nogpu").jobs[0].requirements.gpu.count == 0
    assert resolved("env-list").jobs[0].env["A"] == "1"
    # the command line's arguments that set no variable are the run's args
    job = resolved("args", ["--epochs", "3", "two words"]).jobs[0]
    assert job.commands == ["echo train --epochs 3 'two words'"], job.commands
    assert resolved("args").jobs[0].commands == ["echo train "]


def test_keys_no_form_has_any_more(tmp_path):
    files = _files(tmp_path, """\
        workflows:
          - name: tpl
            template:
              image: ubuntu
          - name: prev
            commands: [echo]
            previous_jobs: [a]
          - name: plain
            commands: [echo]
            comands: [echo]
        """)
    said = {e.line: (e.message, e.hint) for e in validate_project(files).errors}
    assert said[3][0].startswith("'template' in workflow 'tpl' was retired: the block of February 2022 held image, "
                                 "commands and resources"), said
    assert "`dependencies: [prepare:latest]`" in said[7][0]
    assert said[10] == ("unknown key 'comands' in workflow 'plain'", "did you mean 'commands'?")


def test_run_args_only_where_a_workflow_asks_for_them(tmp_path):
    files = _files(tmp_path, """\
        workflows:
          - name: plain
            commands: [echo hi]
          - name: args
            commands: ["python train.py ${{ run.args }}"]
        """)
    from dstack.core.errors import ConfigError

    try:
        command_line(files, "plain", ["--epochs", "3"])
        overrides = None
    except ConfigError as e:
        overrides = e
    # `plain` takes variables only: `--epochs 3` is a variable override (refused later, as it names none)
    assert overrides is None or "epochs" in overrides.message
    assert command_line(files, "args", ["--epochs", "3"]) == ({}, "--epochs 3")


def test_the_schema_takes_the_2022_forms_and_the_python_provider():
    """An editor completes and checks them: the JSON Schema shipped with dstack accepts what dstack accepts."""
    import json

    import jsonschema
    import yaml

    from dstack.config.schema import SCHEMA_FILE

    schema = json.loads(SCHEMA_FILE.read_text())
    python = """\
    workflows:
      - name: a
        provider: python
        python_script: train.py
        python: 3.10
        args: --epochs 3
      - name: b
        provider: python
        file: train.py
        version: "3.11"
        requirements: requirements.txt
        args: [--epochs, 3]
    """
    for text in (FILE, textwrap.dedent(python)):
        jsonschema.validate(yaml.safe_load(text), schema)
    wrong = yaml.safe_load(textwrap.dedent(python).replace("file: train.py", "file: train.py\n    commands: [x]"))
    try:
        jsonschema.validate(wrong, schema)
        refused = False
    except jsonschema.ValidationError:
        refused = True
    assert refused  # the python provider runs `file`: `commands` is not one of its keys


def test_entrypoint(dstack, project, busybox_image):
    """`entrypoint` (docker, 2023) replaces the image's, and is given the commands as one script."""
    root = project(f"""\
    workflows:
      - name: shell
        image: {busybox_image}
        entrypoint: /bin/sh -c
        commands: [echo "via $0 entrypoint"]
      - name: own
        provider: docker
        image: {busybox_image}
        entrypoint: [/bin/echo, from-entrypoint]
      - name: host
        provider: bash
        entrypoint: /bin/sh -c
        commands: [echo x]
    """)
    r = dstack("run", "shell", cwd=root, timeout=120)
    assert r.returncode == 0 and "via /bin/sh entrypoint" in r.stdout, r.stdout + r.stderr
    own = dstack("run", "own", cwd=root, timeout=120)
    assert own.returncode == 0 and "from-entrypoint" in own.stdout, own.stdout + own.stderr
    host = dstack("run", "host", cwd=root)
    assert host.returncode == 2 and "`entrypoint` replaces an image's entrypoint" in host.stderr, host.stderr


@pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11 (scripts/test.sh)")
def test_bash_with_the_2022_python_and_requirements(dstack, project):
    """`bash` with `python:` (YAML's number) and `requirements:`: its commands run in a venv of that Python."""
    root = project("""\
    workflows:
      - name: old-bash
        provider: bash
        python: 3.11
        requirements: requirements.txt
        commands:
          - python --version
          - command -v python
    """)
    (root / "requirements.txt").write_text("# nothing to install\n")
    r = dstack("run", "old-bash", cwd=root, timeout=180)
    assert r.returncode == 0 and "Python 3.11" in r.stdout and "/.dstack-venv/bin/python" in r.stdout, r.stdout
