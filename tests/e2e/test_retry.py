"""`retry:` (issue 14, point 4): a job whose runner is lost, or that fails when the workflow says so, starts
again as the same job, its log going on with a line that says why; once the limit is spent it fails."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.e2e.conftest import gone


def test_a_failed_job_starts_again_until_it_succeeds_or_its_retries_are_spent(dstack, project, shared):
    marker = shared / "tried"
    root = project(f"""\
    workflows:
      - name: flaky
        commands:
          - echo attempt
          - test -f {marker} || {{ touch {marker}; echo failing; exit 3; }}
          - echo fine
        retry: {{limit: 2, on: [error]}}
      - name: broken
        commands: [echo broken, exit 3]
        retry: {{limit: 1, on: error}}
      - name: lost-only
        commands: [exit 4]
        retry: 2
    """)
    r = dstack("run", "flaky", cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "attempt\nfailing\n[dstack: it failed on runner " + r.stdout.split("runner ", 1)[1].split(
        " ", 1)[0] + " (exit code 3); the job starts again (attempt 2 of 3)]\nattempt\nfine\n", r.stdout
    run = dstack.runs(root)[0]
    assert run["status"] == "DONE"
    assert dstack("logs", run["run_name"], cwd=root, check=True).stdout == r.stdout

    broken = dstack("run", "broken", cwd=root)
    assert broken.returncode == 3
    assert broken.stdout.count("broken\n") == 2 and "(attempt 2 of 2)" in broken.stdout
    # `retry: 2` covers a lost runner only: an error fails at once
    once = dstack("run", "lost-only", cwd=root)
    assert once.returncode == 4 and "starts again" not in once.stdout


def test_a_job_whose_runner_is_killed_starts_again_on_another(dstack, project, shared):
    marker = shared / "started"
    root = project(f"""\
    workflows:
      - name: survivor
        commands:
          - test -f {marker} && echo second || {{ touch {marker}; echo first; sleep 120; }}
        retry: 1
    """)
    r = dstack("run", "survivor", "-d", cwd=root, check=True)
    name = dstack.runs(root)[0]["run_name"]
    deadline = time.monotonic() + 30
    while "first" not in dstack("logs", name, cwd=root).stdout:  # its output has reached the server
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    runner = dstack.run_info(root, name)["jobs"][0]["runner"]
    pid = json.loads((dstack.home / "runners" / runner / "runner.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not gone(pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    info = dstack.wait_status(root, name, {"DONE", "FAILED"}, timeout=90)
    assert info["status"] == "DONE", info
    job = info["jobs"][0]
    assert job["runner"] != runner
    logs = dstack("logs", name, cwd=root, check=True).stdout
    assert logs.startswith("first\n[dstack: runner ") and logs.endswith(
        "; the job starts again (attempt 2 of 2)]\nsecond\n"), logs
    assert "stopped responding" in logs or "exited before the job ended" in logs
    del r
