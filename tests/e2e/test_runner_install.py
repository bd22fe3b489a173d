"""`dstack-runner install` (issue 14, point 6): a systemd unit that runs the runner at every boot. No systemd runs
here: the unit is checked by `systemd-analyze verify` (Debian's `systemd` package; a structural check without it),
then its command is run as systemd would run it (its ExecStart split and expanded as systemd does, the environment
of its EnvironmentFile= and Environment=), against a real server, and serves a job."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, add_runner


def install(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dstack-runner"), "install", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections: their KEY=VALUE lines, in order (a key may repeat)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = found.setdefault(m.group(1), [])
            continue
        assert current is not None and "=" in line, f"not a unit's line: {line!r}"
        key, value = line.split("=", 1)
        current.append((key, value))
    return found


def exec_start(value: str) -> list[str]:
    """ExecStart's words as systemd makes them: split as a shell would (quotes, backslashes), with %% and $$ made %
    and $; a lone % or $ (a specifier, a variable) is not what we write."""
    assert not re.search(r"%[^%]|%$", value.replace("%%", "")), value
    assert not re.search(r"\$[^$]|\$$", value.replace("$$", "")), value
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value)]


def environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = shlex.split(value)[0]
    return env


def test_the_unit_is_valid_and_its_command_serves_jobs(server, tmp_path, project):  # noqa: F811
    url, client = server
    root = project("workflows:\n  - name: lab\n    commands: [echo \"in the lab on $JOB_ID\"]\n"
                   "    resources: {labels: {zone: lab}}\n")
    issued = add_runner(client, root, "--name", "installed-1")
    (tmp_path / "token").write_text(issued["token"] + "\n")
    unit_path, env_path = tmp_path / "units" / "dstack-runner-lab.service", tmp_path / "etc" / "lab.env"
    unit_path.parent.mkdir()
    r = install("--server", url, "--token-file", str(tmp_path / "token"), "--labels", "zone=lab",
                "--output", str(unit_path), "--env-file", str(env_path), "--", "--no-docker")
    assert r.returncode == 0, r.stderr
    assert "systemctl daemon-reload && systemctl enable --now dstack-runner-lab" in r.stdout
    assert (tmp_path / "token").exists()  # the user's file is left as it is

    text = unit_path.read_text()
    assert issued["token"] not in text
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600 and stat.S_IMODE(env_path.parent.stat().st_mode) == 0o700
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True, timeout=60)
        assert v.returncode == 0 and v.stdout + v.stderr == "", v.stdout + v.stderr  # not even a warning
    unit = sections(text)
    assert set(unit) == {"Unit", "Service", "Install"}
    service = dict(unit["Service"])
    assert service["Restart"] == "always" and ("WantedBy", "multi-user.target") in unit["Install"]
    assert Path(service["EnvironmentFile"]) == env_path

    # run it as systemd would: its command, in the environment it gives (the state folder a temporary one here)
    argv = exec_start(service["ExecStart"])
    assert argv[1:6] == ["-m", "dstack.runner.main", "start", "--server", url]
    env = {"PATH": os.environ["PATH"], **environment_file(env_path),
           **dict(v.split("=", 1) for k, v in unit["Service"] if k == "Environment"),
           "DSTACK_HOME": str(tmp_path / "state")}
    runner = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (listed := json.loads(client("runners", "--json", cwd=root, check=True).stdout)):
            assert time.monotonic() < deadline and runner.poll() is None, runner.stderr and runner.stderr.read()
            time.sleep(0.2)
        assert listed[0]["name"] == "installed-1" and listed[0]["labels"] == {"zone": "lab"}
        r = client("run", "lab", cwd=root)
        assert r.returncode == 0 and "in the lab on" in r.stdout, r.stderr
        runner.send_signal(signal.SIGTERM)  # as `systemctl stop` does (KillMode=mixed: the runner first)
        assert runner.wait(timeout=int(service["TimeoutStopSec"])) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


@pytest.mark.parametrize(("args", "code", "said"), [
    ((), 2, "a token is needed"),
    (("--token", "t", "--", "--bogus"), 2, "dstack-runner start would refuse --bogus: No such option"),
    (("--token", "t", "--", "--token", "u"), 2, "the token goes to install's own --token"),
    (("--token", "t", "--labels", "novalue"), 2, "KEY=VALUE"),
    (("--token", "t", "--output", "/no/such/folder/dstack-runner.service"), 1,
     "/no/such/folder does not exist: is systemd this machine's init?"),
    (("--token", "t", "--output", "{tmp}/runner.unit"), 2, "a systemd service's file name ends with .service"),
    (("--token", "t", "--output", "{tmp}/existing.service"), 1, "existing.service exists already; --force replaces it"),
])
def test_what_the_unit_could_not_run_is_refused_and_nothing_is_written(tmp_path, args, code, said):
    (tmp_path / "existing.service").write_text("[Unit]\n")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--output" not in args:
        args = ["--output", str(tmp_path / "dstack-runner.service"), *args]
    r = install("--server", "http://10.0.0.1:3000", "--env-file", str(tmp_path / "t.env"), *args,
                env={"DSTACK_TOKEN": ""})
    assert r.returncode == code and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.service"]
    assert (tmp_path / "existing.service").read_text() == "[Unit]\n"
