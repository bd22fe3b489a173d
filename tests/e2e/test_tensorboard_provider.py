"""The `tensorboard` provider: two runs that both saved `logs` are mounted side by side (`runs/<run>`), TensorBoard
(installed from the package index into the job's venv) serves their scalars behind the run's token, and refuses
requests without it."""

from __future__ import annotations

import http.cookiejar
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import last_run, log_match

WORKFLOWS = """\
workflows:
  - name: train
    provider: python
    python: 3.11
    file: train.py
    requirements: requirements.txt
    cache: [~/.cache/pip]
    artifacts: [logs]
  - name: board
    provider: tensorboard
    python: 3.11
    runs: [$first, $second]
    logdir: logs
"""

TRAIN = """\
import os, time
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

writer = EventFileWriter("logs")
scale = float(os.environ["SCALE"])
for step in range(3):
    value = Summary.Value(tag="loss", simple_value=scale / (step + 1))
    writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(value=[value])))
writer.close()
print("wrote", os.listdir("logs"))
"""


@pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11 (scripts/test.sh)")
def test_tensorboard_serves_two_runs_with_its_token(dstack, project):
    root = project(WORKFLOWS, "variables:\n  train:\n    scale: 1\n  board:\n    first: x\n    second: y\n")
    (root / "train.py").write_text(TRAIN)
    (root / "requirements.txt").write_text("tensorboard\n")
    runs = []
    for scale in ("1", "10"):
        dstack("run", "train", "--scale", scale, cwd=root, check=True, timeout=300)
        runs.append(last_run(dstack, root)["run_name"])

    run = json.loads(dstack("run", "board", "--first", runs[0], "--second", runs[1], "--json", cwd=root,
                            check=True).stdout)["run_name"]
    try:
        # pip installs TensorBoard, which then starts
        found, _ = log_match(dstack, root, run, r"TensorBoard is ready: http://[^:/]+:(\d+)/\?token=([0-9a-f]+)", 240)
        port, token = found.group(1), found.group(2)
        base = f"http://127.0.0.1:{port}"

        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/data/runs", timeout=10)
        assert refused.value.code == 403
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/data/runs?token=not-{token}", timeout=10)
        assert refused.value.code == 403

        # the URL's token lets the browser in; a cookie keeps it in for the page's own requests
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with browser.open(f"{base}/?token={token}", timeout=30) as r:
            assert r.status == 200 and b"<" in r.read()
        seen: list = []
        for _ in range(60):  # TensorBoard reads the logs in the background, a moment after it starts
            with browser.open(f"{base}/data/runs", timeout=30) as r:
                seen = json.loads(r.read())
            if len(seen) == 2:
                break
            time.sleep(1)
        assert sorted(name.split("/")[0] for name in seen) == sorted(runs), seen  # TensorBoard's run: "<run>/."
        second = next(name for name in seen if name.startswith(runs[1] + "/"))
        with browser.open(f"{base}/data/plugin/scalars/scalars?run={second}&tag=loss", timeout=30) as r:
            points = json.loads(r.read())
        assert [round(p[2], 3) for p in points] == [10.0, 5.0, 3.333], points
        assert token not in json.dumps(dstack.run_info(root, run)["jobs"])  # in the job's log only
    finally:
        dstack("stop", run, cwd=root)
    assert dstack.wait_status(root, run, {"STOPPED", "DONE", "FAILED", "ABORTED"}, timeout=60)["status"] != "FAILED"


def test_tensorboard_mistakes(dstack, project):
    root = project("""\
    workflows:
      - name: board
        provider: tensorboard
        runs: []
      - name: nothing-yet
        provider: tensorboard
        runs: [no-such-run-9]
      - name: told
        provider: tensorboard
        runs: [a]
        commands: [echo]
    """)
    r = dstack("run", "board", cwd=root)
    assert r.returncode == 2 and "workflows.yaml:4:" in r.stderr and "runs" in r.stderr, r.stderr
    r = dstack("run", "nothing-yet", cwd=root)
    assert r.returncode != 0 and "no-such-run-9" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = dstack("run", "told", cwd=root)
    assert r.returncode == 2 and "before_run" in r.stderr, r.stderr
