"""A server in the foreground and a self-hosted runner joining it, as in the README."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

from tests.e2e.conftest import BIN, Dstack


def test_self_hosted_runner_runs_what_it_can(tmp_path, project, busybox_image):
    home = tmp_path / "server-home"
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    server = subprocess.Popen([str(BIN / "dstack"), "server", "--port", "0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    runner = None
    try:
        info_file = home / "server" / "server.json"
        deadline = time.monotonic() + 30
        while not info_file.exists():
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.1)
        url = json.loads(info_file.read_text())["url"]
        token = (home / "server" / "token").read_text().strip()
        client = Dstack(tmp_path / "client-home")
        client.env.update({"DSTACK_SERVER_URL": url, "DSTACK_TOKEN": token})
        root = project(f"""\
        workflows:
          - name: host
            commands: [echo "on $(hostname) as $RUN_NAME"]
          - name: boxed
            image: {busybox_image}
            commands: [echo boxed]
        """)
        # a wrong token: a clear error, no traceback
        bad = subprocess.run([str(BIN / "dstack-runner"), "start", "--server", url, "--token", "wrong"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "wrong token" in bad.stderr and "Traceback" not in bad.stderr
        assert "a runner's token comes from `dstack runners add`" in bad.stderr, bad.stderr
        # the URL without its token is an error, not a silent fallback to the local server
        half = Dstack(tmp_path / "half-home")
        half.env["DSTACK_SERVER_URL"] = url
        r = half("status", cwd=tmp_path)
        assert r.returncode == 1 and "DSTACK_TOKEN is not" in r.stderr
        # no runner yet and no backend: nothing can run anything
        r = client("run", "host", cwd=root)
        assert r.returncode == 2 and "no runner is registered" in r.stderr

        runner = subprocess.Popen([str(BIN / "dstack-runner"), "start", "--server", url, "--token", token,
                                   "--no-docker", "--workdir", str(tmp_path / "runner")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not json.loads(client("runners", "--json", cwd=root, check=True).stdout):
            assert time.monotonic() < deadline, "the runner did not register"
            time.sleep(0.2)
        runners = json.loads(client("runners", "--json", cwd=root, check=True).stdout)
        assert runners[0]["backend"] is None and runners[0]["resources"]["docker"] is False

        r = client("run", "host", cwd=root, check=True)
        assert re.search(r"on \S+ as [a-z]+-[a-z]+-\d+", r.stdout)
        assert json.loads(client("status", "--json", cwd=root, check=True).stdout)[0]["jobs"][0]["runner"] == \
            runners[0]["name"]
        # the runner has no Docker: a job with an image is never sent to it, and fails at once
        r = client("run", "boxed", cwd=root)
        assert r.returncode == 2 and "lacks Docker" in r.stderr

        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=20) == 0
        assert json.loads(client("runners", "--json", cwd=root, check=True).stdout) == []
    finally:
        if runner and runner.poll() is None:
            runner.kill()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
