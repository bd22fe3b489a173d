"""The `python` provider (the 2022 one): a script with its arguments and the Python version it needs, its
requirements installed from a local wheel folder into the job's own venv, on a local runner's host; a version that
is not installed fails naming it; the 2022 spellings (`script`, `python_script`, `python: 3.10` read as 3.1)."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from dstack.core.errors import ConfigError
from dstack.providers.python import PythonProvider, PythonSpec

TRAIN = """\
import sys
import dstackdemo
print("args:", sys.argv[1:])
print("python:", "%d.%d" % sys.version_info[:2], "demo:", dstackdemo.VALUE)
print("in a venv:", sys.prefix != sys.base_prefix)
"""


def _wheel(folder: Path) -> None:
    """A tiny pure-Python wheel, made by hand: what a lab's private package folder would hold."""
    name = "dstackdemo-1.0-py3-none-any.whl"
    files = {"dstackdemo/__init__.py": b"VALUE = 42\n",
             "dstackdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: dstackdemo\nVersion: 1.0\n",
             "dstackdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              b"Tag: py3-none-any\n"}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for n, d in files.items()) + "dstackdemo-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / name, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("dstackdemo-1.0.dist-info/RECORD", record)


@pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11 (scripts/test.sh)")
def test_python_provider_end_to_end(dstack, project):
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    root = project(f"""\
    workflows:
      - name: train
        provider: python
        file: train.py
        args: --epochs 3 --name "two words"
        requirements: requirements.txt
        version: "{version}"
      - name: old
        provider: python
        script: train.py
        python: "3.7"
    """)
    (root / "train.py").write_text(TRAIN)
    (root / "wheels").mkdir()
    _wheel(root / "wheels")
    (root / "requirements.txt").write_text("--no-index\n--find-links wheels\ndstackdemo==1.0\n")
    r = dstack("run", "train", cwd=root, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "args: ['--epochs', '3', '--name', 'two words']" in r.stdout, r.stdout
    assert f"python: {version} demo: 42" in r.stdout and "in a venv: True" in r.stdout, r.stdout

    old = dstack("run", "old", cwd=root, timeout=60)
    assert old.returncode != 0
    assert "python3.7 is not installed on this runner's host" in old.stdout + old.stderr, old.stdout + old.stderr
    assert "docker: true" in old.stdout + old.stderr


def test_python_spec_forms():
    # 2022's spellings: `python_script`, `python: 3.10` (YAML's 3.1), args as a list of numbers
    spec = PythonSpec.model_validate({"name": "a", "python_script": "./src/t.py", "python": 3.1, "args": ["-n", 3]})
    assert (spec.file, spec.version, spec.args) == ("src/t.py", "3.10", ["-n", "3"])
    assert PythonSpec.model_validate({"name": "a", "file": "t.py", "version": 3.9}).version == "3.9"
    job = PythonProvider().create_jobs(PythonSpec.model_validate(
        {"name": "a", "file": "t.py", "version": "3.11", "docker": True}), {})[0]
    assert job.image == "python:3.11" and job.commands[-1] == "python t.py"
    for bad, said in (({"file": "t.py", "version": "three"}, "is not a Python version"),
                      ({"file": "t.py", "commands": ["echo"]}, "runs `file`"),
                      ({"file": "/abs/t.py"}, "must be a path relative"),
                      ({"file": "t.py", "args": "'open"}, "a quote not closed"),
                      ({"file": "t.py", "image": "x", "docker": True}, "not both"),
                      ({}, "file")):
        with pytest.raises(ValueError, match=said):
            PythonSpec.model_validate({"name": "a", **bad})


def test_python_provider_errors_at_their_place(tmp_path):
    from dstack.config.files import ProjectFiles
    from dstack.config.workflows import validate_project

    (tmp_path / ".dstack").mkdir()
    (tmp_path / ".dstack" / "workflows.yaml").write_text(
        "workflows:\n  - name: a\n    provider: python\n    file: t.py\n    version: three\n"
        "  - name: b\n    provider: python\n    fiel: t.py\n")
    found = validate_project(ProjectFiles.read(tmp_path))
    said = [(e.line, e.message) for e in found.errors]
    assert said[0][0] == 5 and "is not a Python version" in said[0][1], said
    assert said[1][0] == 8 and "unknown key 'fiel'" in said[1][1], said
    assert all(isinstance(e, ConfigError) for e in found.errors)


def test_dstack_providers_lists_each_with_its_keys(tmp_path):
    import json

    from tests.e2e.conftest import Dstack

    d = Dstack(tmp_path / "home")  # no server: the installed packages alone
    listed = json.loads(d("providers", "--json", cwd=tmp_path, check=True).stdout)
    by_name = {p["name"]: p for p in listed}
    assert {"bash", "docker", "python"} <= set(by_name)
    keys = {k["key"]: k for k in by_name["python"]["keys"]}
    assert keys["file"]["required"] and "commands" not in keys and keys["requirements"]["help"]
    text = d("providers", "python", cwd=tmp_path, check=True).stdout
    assert text.startswith("python: ") and "  file " in text
    wrong = d("providers", "pyhton", cwd=tmp_path)
    assert wrong.returncode == 2 and "no provider 'pyhton' is installed" in wrong.stderr
    assert "did you mean 'python'?" in wrong.stderr


def test_dstack_run_a_provider_with_no_workflow(dstack, tmp_path):
    """The 2022 form: `dstack run python FILE ARGS`, `dstack run bash -c CMD`, with no workflows file; its
    mistakes are said for the command line."""
    import subprocess

    root = tmp_path / "plain"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "train.py").write_text("import sys\nprint('argv', sys.argv[1:])\n")
    r = dstack("run", "python", "train.py", "--epochs", "3", "two words", cwd=root, timeout=120)
    assert r.returncode == 0 and "argv ['--epochs', '3', 'two words']" in r.stdout, r.stdout + r.stderr
    b = dstack("run", "bash", "-c", "echo from bash", "-c", "echo twice", cwd=root, timeout=120)
    assert b.returncode == 0 and "from bash\ntwice" in b.stdout.replace("\r", ""), b.stdout + b.stderr
    none = dstack("run", "python", cwd=root)
    assert none.returncode == 2 and "`dstack run python` needs the script to run" in none.stderr, none.stderr
    bad = dstack("run", "python", "--gpu", "x", "train.py", cwd=root)
    assert bad.returncode == 2 and bad.stderr.startswith("dstack run python: error:"), bad.stderr
    assert "Traceback" not in none.stderr + bad.stderr
    # a workflow of that name wins over the provider
    (root / ".dstack").mkdir()
    (root / ".dstack" / "workflows.yaml").write_text("workflows:\n  - name: python\n    commands: [echo mine]\n")
    mine = dstack("run", "python", cwd=root, timeout=120)
    assert mine.returncode == 0 and "mine" in mine.stdout, mine.stdout + mine.stderr
