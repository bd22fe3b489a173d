"""The syntax is discoverable from the installed CLI: `dstack run WORKFLOW --help` shows the workflow's help, its
variables and how to set them, from the files alone (no server); `dstack docs` prints the reference that ships
in the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Dstack

WORKFLOWS = """\
workflows:
  - name: train
    help: Trains the model on the data of prepare:latest
    commands:
      - python3 train.py --epochs $epochs --seed ${{ seed }}
      - echo $HOME $not_ours
    resources:
      v100/gpu: $gpu
  - name: prepare
    commands: [echo]
"""
VARIABLES = """\
variables:
  global:
    seed: 7
    epochs: 1
  train:
    epochs: 5
"""


@pytest.fixture
def cli(tmp_path) -> Dstack:
    """The CLI with a DSTACK_HOME of its own, where no server ever started."""
    return Dstack(tmp_path / "home")


def no_server_started(home: Path) -> bool:
    """Nothing under DSTACK_HOME: no server (its folder, token, database), no runner, no store."""
    return not home.exists() or not any(home.iterdir())


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_run_workflow_help_shows_its_help_variables_and_how_to_set_them(cli, project, flag):
    root = project(WORKFLOWS, VARIABLES)
    r = cli("run", "train", flag, cwd=root, timeout=30)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("Usage: dstack run train [--NAME VALUE]... [OPTIONS]"), out
    flat = " ".join(out.split())  # as wrapped for any width
    assert "Trains the model on the data of prepare:latest" in flat
    assert "Workflow 'train' of .dstack/workflows.yaml:2, provider bash." in flat
    # declared: the value, the file and line, the section it comes from (the workflow's own wins over global)
    assert "--epochs VALUE default 5, from .dstack/variables.yaml:6 (under 'train:')" in flat, out
    assert "--seed VALUE default 7, from .dstack/variables.yaml:3 (under 'global:')" in flat, out
    # referenced, declared nowhere: required, with where it is used; the shell's own `$HOME` is not a variable
    assert "--gpu VALUE required: no file declares it; $gpu is used at .dstack/workflows.yaml:8:17" in flat, out
    assert "--HOME" not in out and "not_ours" not in out
    assert "Override a variable with --NAME VALUE" in flat and "`dstack run train --gpu VALUE --seed 7`" in flat
    # then the options of `dstack run`
    assert out.index("Variables:") < out.index("Options:") and "--detach" in out.split("Options:")[1]
    assert no_server_started(cli.home), list(cli.home.iterdir())


def test_run_workflow_help_without_variables_says_where_to_declare_them(cli, project):
    root = project(WORKFLOWS)
    r = cli("run", "prepare", "--help", cwd=root, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "none: declare them in .dstack/variables.yaml, under 'global:'" in " ".join(r.stdout.split())


def test_help_of_an_unknown_workflow_is_a_clear_error(cli, project):
    root = project(WORKFLOWS, VARIABLES)
    r = cli("run", "trian", "--help", cwd=root, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error: no workflow named 'trian'" in r.stderr and "did you mean 'train'?" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert no_server_started(cli.home)


def test_help_of_a_provider_run_with_no_workflow(cli, project):
    """`dstack run PROVIDER --help` (the 2022 form): its arguments and the keys they stand for; a workflow of the
    project named like a provider is the workflow."""
    root = project(WORKFLOWS.replace("name: prepare", "name: python"), VARIABLES)
    r = cli("run", "tensorboard", "--help", cwd=root, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("Usage: dstack run tensorboard [-e NAME=VALUE]"), r.stderr
    assert "runs [runs ...]" in r.stdout and "--logdir LOGDIR" in r.stdout and "\n  runs " in r.stdout, r.stdout
    r = cli("run", "python", "--help", cwd=root, timeout=30)
    assert r.returncode == 0 and "Workflow 'python' of .dstack/workflows.yaml" in r.stdout, r.stdout
    assert no_server_started(cli.home)


def test_help_of_a_workflow_in_broken_files_is_their_located_error(cli, project):
    root = project(WORKFLOWS.replace("  - name: prepare", "  - name: [prepare"), VARIABLES)
    r = cli("run", "train", "--help", cwd=root, timeout=30)
    assert r.returncode == 2 and ".dstack/workflows.yaml:" in r.stderr and "malformed YAML" in r.stderr, r.stderr
    (root / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    (root / ".dstack" / "variables.yaml").write_text(VARIABLES + "  trian: {}\n")
    r = cli("run", "train", "-h", cwd=root, timeout=30)
    assert r.returncode == 2, r.stderr
    assert ".dstack/variables.yaml:7:3: error: variables for an unknown workflow 'trian'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert no_server_started(cli.home)


def test_run_help_lists_the_projects_workflows(cli, project, tmp_path):
    root = project(WORKFLOWS, VARIABLES)
    r = cli("run", "--help", cwd=root, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "Usage: dstack run [OPTIONS] [WORKFLOW]" in r.stdout and "--detach" in r.stdout
    listing = r.stdout.split(f"Workflows of {root}:")[1]
    assert "train    Trains the model on the data of prepare:latest" in listing and "prepare" in listing, r.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("run", "--help", cwd=elsewhere, timeout=30)
    assert r.returncode == 0 and "Usage: dstack run" in r.stdout and "Workflows of" not in r.stdout
    assert no_server_started(cli.home)


def test_a_variable_that_help_calls_required_is_set_from_the_command_line(dstack, project):
    """What `--help` offers (`--gpu VALUE` for a `$gpu` no file declares) is what `dstack run` takes."""
    root = project("workflows:\n  - name: g\n    commands:\n      - echo \"count=${{ count }}\"\n")
    r = dstack("run", "g", "--count", "3", cwd=root)
    assert r.returncode == 0 and "count=3" in r.stdout, (r.stdout, r.stderr)
    r = dstack("run", "g", cwd=root)
    assert r.returncode == 2 and "undefined variable 'count'" in r.stderr and "--count VALUE" in r.stderr


def test_dstack_help_points_to_dstack_docs(cli, tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "`dstack docs` shows the full syntax" in " ".join(r.stdout.split())
    assert "docs" in r.stdout.split("Commands:")[1]


def test_dstack_docs_prints_the_reference_and_the_schema(cli, tmp_path):
    r = cli("docs", cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# Workflow files: the complete syntax")
    assert "## Variables" in r.stdout and "## Editor support" in r.stdout
    assert cli("docs", "workflows", cwd=tmp_path).stdout == r.stdout
    schema = json.loads(cli("docs", "schema", cwd=tmp_path, check=True).stdout)
    assert schema["$schema"].startswith("http://json-schema.org/") and "workflows" in schema["properties"]
    assert not cli.home.exists(), "dstack docs needs no DSTACK_HOME"
    bad = cli("docs", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_files_dstack_init_writes_point_to_dstack_docs(cli, tmp_path):
    cli("init", cwd=tmp_path, check=True)
    for name in ("workflows.yaml", "variables.yaml"):
        assert "`dstack docs` shows the full syntax" in (tmp_path / ".dstack" / name).read_text(), name


def test_the_reference_ships_in_the_wheel(tmp_path):
    """What a wheel holds is what setuptools' build_py lays out (bdist_wheel zips it): from a copy of the
    sources, offline. `dstack docs` then reads both files from that build, not from the source tree."""
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, tmp_path / name)
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(lib)], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    assert (lib / "dstack" / "docs" / "workflows.md").is_file()
    assert (lib / "dstack" / "schemas" / "workflows.json").is_file()
    env = {**os.environ, "PYTHONPATH": str(lib), "DSTACK_HOME": str(tmp_path / "home")}
    code = "import sys, dstack; print(dstack.__file__); sys.argv[0] = 'dstack'; from dstack.cli.main import main; main()"
    for topic, start in (("workflows", "# Workflow files"), ("schema", "{")):
        r = subprocess.run([sys.executable, "-c", code, "docs", topic], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        where, text = r.stdout.split("\n", 1)
        assert where.startswith(str(lib)), where
        assert text.startswith(start), text[:200]
