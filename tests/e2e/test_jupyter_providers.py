"""The `lab` provider (and `notebook`, the same code): JupyterLab installed from the package index into the job's
own venv, serving on the job's port, answering HTTP with the run's token and refusing without it; its URL printed
once it answers; `dstack stop` ends it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dstack.providers.jupyter import LabProvider, NotebookProvider
from tests.e2e.conftest import log_match


@pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11 (scripts/test.sh)")
def test_lab_answers_with_its_token(dstack, project):
    root = project("""\
    workflows:
      - name: ide
        provider: lab
        python: 3.11
    """)
    run = json.loads(dstack("run", "ide", "--json", cwd=root, check=True).stdout)["run_name"]
    try:
        # pip installs JupyterLab (~15 s here) and it starts
        url, _ = log_match(dstack, root, run, r"JupyterLab is ready: http://[^:/]+:(\d+)/lab\?token=([0-9a-f]+)", 240)
        port, token = url.group(1), url.group(2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=10) as r:
            assert r.status == 200 and "started" in json.loads(r.read())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10)
        assert refused.value.code in (401, 403)
        spec = json.dumps(dstack.run_info(root, run)["jobs"])
        assert token not in spec  # the token is in the job's log only, never in what the API says of the job
    finally:
        dstack("stop", run, cwd=root)
    assert dstack.wait_status(root, run, {"STOPPED", "DONE", "FAILED", "ABORTED"}, timeout=60)["status"] != "FAILED"


def test_jupyter_jobs():
    from dstack.providers.jupyter import JupyterSpec

    spec = JupyterSpec.model_validate({"name": "nb", "provider": "notebook", "python": 3.1,
                                       "requirements": "req.txt", "setup": ["echo first"]})
    job = NotebookProvider().create_jobs(spec, {})[0]
    assert job.ports == 1 and "JUPYTER_TOKEN" not in job.env  # made in the job: the API never shows it
    assert any("secrets.token_hex(24)" in c for c in job.commands)
    assert job.commands[0] == "echo first" and job.commands[1].startswith("python3.10 -m venv")
    assert any("-r req.txt" in c for c in job.commands) and job.commands[-1].startswith("exec jupyter notebook")
    other = LabProvider().create_jobs(JupyterSpec.model_validate({"name": "l"}), {})[0]
    assert other.commands[-1].startswith("exec jupyter lab")
    with pytest.raises(ValueError, match="runs the IDE"):
        JupyterSpec.model_validate({"name": "l", "provider": "lab", "commands": ["x"]})
