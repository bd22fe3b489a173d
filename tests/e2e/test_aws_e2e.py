"""The `aws` backend end to end, through a real server and the CLI: EC2 is moto (on loopback) behind the proxy of
tests/integration/test_aws_backend.py (AWS's capacity errors, Debian's and Canonical's AMIs), which listens on a
test bridge so that test hosts (network namespaces, tests/netns.py) reach it; the test plays EC2's part that moto
lacks: it reads each instance's user-data back and runs it with sh as root on a test host, its idle action
(`shutdown -h now`, which terminates an instance whose shutdown behaviour is `terminate`) made a TerminateInstances
call of that instance. The instance's image is the one the backend chooses for the server's Python (the test's: the
same venv), Debian 12's on 3.11.

What it shows: a queued job makes the server create an instance (the job says `provisioning ...` meanwhile); its
runner installs from the server's wheels, registers and runs the job to DONE with an artifact, the job's cost the
instance's price times its time; with `--max-total 1` a second run makes no second instance; a capacity refusal is
said in the job's reason and the next offer is taken; an idle runner exits and its instance terminates itself; after
a restart the server terminates an instance with its tags that it does not know; and the secret access key is in no
file of the server, no log line and no API answer."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest

from dstack.backends.aws import IMAGE_FAMILIES
from tests.e2e.conftest import BIN, Dstack, eventually
from tests.integration.test_aws_backend import DEFAULT_IMAGE, ERRORS, PYTHON, Proxy, _ProxyHandler
from tests.netns import Host

ACCESS_KEY = "AKIAQXE2EAWSKEYID042"
SECRET_KEY = "e2eAwsSecret/neverShownAnywhere+9876543210"
CATALOG = """\
instance_name,location,price,cpu,memory,gpu_count,gpu_name,gpu_memory,spot,disk_size,gpu_vendor,flags,cpu_arch,provider_data
t3.medium,us-east-1,0.0416,2,4.0,0,,,False,,,,x86,{}
t3.medium,us-east-1,0.0125,2,4.0,0,,,True,,,,x86,{}
t3.large,us-east-1,0.0832,2,8.0,0,,,False,,,,x86,{}
"""
WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - mkdir -p out
      - echo made on $(hostname -I) > out/result.txt
      - sleep 4
    artifacts: [out]
  - name: again
    commands: [echo again]
  - name: third
    commands: [echo third]
"""
SHUTDOWN = "'shutdown -h now'"  # the idle action as the user-data has it (shell-quoted)
# what EC2 does on the instance's shutdown (InstanceInitiatedShutdownBehavior=terminate), here a call of the API
TERMINATE = """\
import sys, boto3
url, instance = sys.argv[1:3]
ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=url, aws_access_key_id="x", aws_secret_access_key="x")
state = ec2.terminate_instances(InstanceIds=[instance])["TerminatingInstances"][0]["CurrentState"]["Name"]
print("EC2: instance", instance, "is", state, flush=True)
"""

pytestmark = pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs Debian's python3.11")


class BridgeProxy(Proxy):
    """The integration test's proxy, listening where test hosts reach it (the bridge's address)."""

    def __init__(self, moto: tuple[str, int], address: str):
        self.moto, self.plan, self.calls = moto, {}, []
        ThreadingHTTPServer.__init__(self, (address, 0), _ProxyHandler)


class ServerProcess:
    """`dstack server` in the foreground on ADDRESS:PORT, its output in a file that outlives restarts."""

    def __init__(self, home: Path, address: str, log: Path):
        self.home, self.address, self.log_path, self.port = home, address, log, 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # only the stored credentials
        env.update({"DSTACK_HOME": str(self.home), "DSTACK_MAX_LOCAL_RUNNERS": "0"})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "dstack"), "server", "--host", self.address, "--port",
                                          str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        info = self.home / "server" / "server.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, f"no server: {self.log()[-3000:]}"
            time.sleep(0.1)
        self.url = json.loads(info.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.token = (self.home / "server" / "token").read_text().strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Machine:
    """An EC2 instance's user-data run with sh, as root with a bare environment, on a test host. Its paths are
    moved under `disk` (the venv is shared: what an AMI would have baked in after the first instance)."""

    def __init__(self, host: Host, instance_id: str, script: str, disk: Path, proxy_url: str, jobs_base: Path):
        self.id = instance_id
        root = disk / instance_id
        root.mkdir(parents=True)
        (disk / "terminate.py").write_text(TERMINATE)
        on_idle = f"{sys.executable} {disk / 'terminate.py'} {proxy_url} {instance_id}"
        assert SHUTDOWN in script
        script = (script.replace(SHUTDOWN, f"'{on_idle}'").replace("/var/lib/dstack-runner", str(root / "var"))
                  .replace("/opt/dstack", str(disk / "venv")))
        self.user_data = root / "user-data"
        self.user_data.write_text(script)
        self.log_path = root / "var" / "runner.log"
        self.err = open(root / "stderr", "w+")
        bare = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"DSTACK_JOBS_DIR={jobs_base}"]
        self.proc = subprocess.Popen(host.run([*bare, "sh", str(self.user_data)]), stdout=subprocess.DEVNULL,
                                     stderr=self.err, start_new_session=True)

    def log(self) -> str:
        self.err.seek(0)
        runner = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- stderr\n{self.err.read()}\n--- {self.log_path}\n{runner}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the script passes it on to its runner
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the script, its runner and what that started
                self.proc.wait()
        self.err.close()


class Sampler(threading.Thread):
    """Every 0.2 s: this server's instances alive in moto, and those the server counts (from the request until
    the backend confirms them gone); the most of each seen."""

    def __init__(self, ec2, server_id: str, server: ServerProcess):
        super().__init__(daemon=True)
        self.ec2, self.server_id, self.server = ec2, server_id, server
        self.most_in_ec2 = self.most_counted = self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            alive = _instances(self.ec2, self.server_id, ["pending", "running", "stopping", "stopped"])
            self.most_in_ec2 = max(self.most_in_ec2, len(alive))
            try:
                rows = httpx.get(f"{self.server.url}/api/instances", timeout=5,
                                 headers={"Authorization": f"Bearer {self.server.token}"}).json()
                self.most_counted = max(self.most_counted, len(rows))
            except (httpx.HTTPError, ValueError):  # restarting
                pass
            self.samples += 1

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def _instances(ec2, server_id: str, states: list[str]) -> list[dict]:
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": "tag:dstack:server", "Values": [server_id]}, {"Name": "instance-state-name", "Values": states}])
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def _state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]




@pytest.fixture
def moto_ec2():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()
    server.stop()


def test_aws_runners_on_demand_through_the_server(hosts, moto_ec2, tmp_path, project, jobs_base):  # noqa: F811
    host = hosts.add("ec2")
    proxy = BridgeProxy(moto_ec2, hosts.address)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy_url = f"http://{hosts.address}:{proxy.server_address[1]}"
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=f"http://{moto_ec2[0]}:{moto_ec2[1]}",
                       aws_access_key_id="x", aws_secret_access_key="x")
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "aws.csv").write_text(CATALOG)
    disk = Path(tempfile.mkdtemp(prefix="dstack-ec2-"))  # the instances' disks (a short path, no quoting)
    server = ServerProcess(tmp_path / "server-home", hosts.address, tmp_path / "server.log")
    machines: list[Machine] = []
    sampler: Sampler | None = None
    answers: list[str] = []  # every API answer and CLI output: the secret is in none of them
    started = time.monotonic()
    try:
        server.start()
        server_id = (server.home / "server" / "server.id").read_text().strip()
        d = Dstack(tmp_path / "client-home")  # a client of this server only (it would start one of its own)
        d.env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                      "DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
        root = project(WORKFLOWS)

        def cli(*args: str) -> str:
            out = d(*args, cwd=root, check=True).stdout
            answers.append(out)
            return out

        def api(path: str, **params) -> list | dict:
            r = httpx.get(f"{server.url}{path}", params=params, headers={"Authorization": f"Bearer {server.token}"},
                          timeout=30)
            assert r.status_code == 200, (path, r.status_code, r.text)
            answers.append(r.text)
            return r.json()

        def job(run: str) -> dict:
            return json.loads(cli("status", run, "--json"))["jobs"][0]

        def submit(workflow: str) -> str:
            return json.loads(cli("run", workflow, "--json"))["run_name"]

        def done(run: str, machine: Machine, within: float = 90) -> dict:
            return eventually(lambda: (j := job(run))["status"].upper() in ("DONE", "FAILED", "ABORTED") and j,
                               within, f"{run} ends ({machine.log()}\n{server.log()[-3000:]})", every=0.5)

        def aws_instances() -> int:
            return next(b for b in json.loads(cli("backends", "--json")) if b["name"] == "aws")["instances"]

        def boot(instance_id: str) -> Machine:
            """EC2 starts the instance: its user-data runs on the test host."""
            attribute = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
            script = base64.b64decode(attribute["UserData"]["Value"]).decode()
            assert SECRET_KEY not in script and ACCESS_KEY not in script
            machine = Machine(host, instance_id, script, disk, proxy_url, jobs_base)
            machines.append(machine)
            return machine

        added = cli("backends", "add", "aws", "--set", f"endpoint_url={proxy_url}", "--set", f"catalog_dir={catalog}",
                    "--set", "regions=[us-east-1]")
        assert "Added backend aws (aws): account 123456789012, regions us-east-1" in added, added
        assert f"image: the newest {IMAGE_FAMILIES[PYTHON].label} AMI" in added, added  # python3 as the server's
        assert "at most 1, idle 20s" in cli("limits", "set", "aws", "--max-total", "1", "--idle-timeout", "20")
        sampler = Sampler(ec2, server_id, server)
        sampler.start()

        # a job makes an instance, and says so while its runner is being started
        first = submit("make")
        reason = "provisioning aws t3.medium, us-east-1, $0.04/h"
        eventually(lambda: job(first).get("reason") == reason, 30,
                    lambda: f"{first} says {reason!r}: {job(first)}\n{server.log()[-3000:]}", every=0.3)
        (raw,) = eventually(lambda: _instances(ec2, server_id, ["pending", "running"]), 10, "an instance in EC2")
        tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
        assert raw["InstanceType"] == "t3.medium" and raw["ImageId"] == DEFAULT_IMAGE and "InstanceLifecycle" not in raw
        runner_a = tags["dstack:runner"]

        # a second run meanwhile: no second instance (--max-total 1), and it says why it waits
        second = submit("again")
        limit = "waiting: limit of 1 aws instance reached"
        eventually(lambda: job(second).get("reason") == limit, 10, lambda: f"{second} says {limit!r}: {job(second)}")
        assert job(first)["reason"] == reason  # as long as the runner is being started

        # the instance boots: its runner installs from the server's wheels and runs both jobs to DONE
        a = boot(raw["InstanceId"])
        info = done(second, a)
        assert "installed dstack" in a.log() and f"registered as {runner_a}" in a.log(), a.log()
        assert info["status"].upper() == "DONE" and info["runner"] == runner_a, info
        one = done(first, a)
        assert one["status"].upper() == "DONE" and one["runner"] == runner_a, one
        assert 0 < one["cost"] < 0.0416 * 60 / 3600, one  # a few seconds of $0.0416/h
        held = (_ts(one["finished_at"]) - _ts(one["started_at"]))
        assert abs(one["cost"] - round(0.0416 * held / 3600, 6)) <= 2e-6, (one, held)
        cli("artifacts", "download", first, "-o", str(tmp_path / "got"))
        made = (tmp_path / "got" / "out" / "result.txt").read_text()
        assert made.split() == ["made", "on", host.address], made  # on the instance: the test host
        (ra,) = [r for r in json.loads(cli("runners", "--json")) if r["name"] == runner_a]
        assert (ra["backend"], ra["price"], ra["offer"]) == ("aws", 0.0416, reason.removeprefix("provisioning ")), ra
        assert len(_instances(ec2, server_id, ["pending", "running", "stopping", "stopped"])) == 1

        # idle: the runner exits after 20 s, the script's idle action terminates the instance in EC2
        assert a.proc.wait(timeout=60) == 0, a.log()
        assert f"EC2: instance {a.id} is " in a.log() and "idle for 20.0s; exiting" in a.log(), a.log()
        assert _state(ec2, a.id) in ("shutting-down", "terminated")
        eventually(lambda: aws_instances() == 0, 30, "no aws instance")
        (row,) = [i for i in api("/api/instances", all="true") if i["instance_id"] == a.id]
        assert row["status"] == "terminated" and row["runner_name"] == runner_a, row

        # capacity: with the first instance gone, the next RunInstances is refused; the job says so, gets the next offer
        calls = len(proxy.calls)
        proxy.plan["RunInstances"] = ["InsufficientInstanceCapacity"]
        third = submit("third")
        refused = (f"aws t3.medium, us-east-1, $0.04/h: InsufficientInstanceCapacity: "
                   f"{ERRORS['InsufficientInstanceCapacity'][1]}")
        reason = f"provisioning aws t3.large, us-east-1, $0.08/h (after {refused})"
        eventually(lambda: job(third).get("reason") == reason, 30, lambda: f"{third} says {reason!r}: {job(third)}")
        (raw,) = _instances(ec2, server_id, ["pending", "running"])
        assert raw["InstanceType"] == "t3.large", raw
        asked = [(f["InstanceType"], f.get("InstanceMarketOptions.MarketType")) for f in proxy.calls[calls:]
                 if f.get("Action") == "RunInstances"]
        assert asked == [("t3.medium", None), ("t3.large", None)], asked  # each once: no SDK retry
        time.sleep(1.5)  # passes later, the job says the same
        assert job(third)["reason"] == reason
        b = boot(raw["InstanceId"])
        three = done(third, b, within=60)
        assert three["status"].upper() == "DONE" and three["cost"] > 0, three
        assert "has dstack" in b.log() and "already" in b.log(), b.log()  # the venv of the first: nothing installed
        sampler.stop()
        assert sampler.most_in_ec2 == 1 and sampler.most_counted == 1 and sampler.samples > 50, vars(sampler)

        # a restart: an instance with the server's tags that it does not know is terminated
        server.stop()
        orphan = ec2.run_instances(ImageId=DEFAULT_IMAGE, InstanceType="t3.medium", MinCount=1, MaxCount=1,
                                   TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                       {"Key": "dstack:server", "Value": server_id},
                                       {"Key": "dstack:runner", "Value": "orphan-1"}]}])["Instances"][0]["InstanceId"]
        restarted = time.monotonic()
        server.start()
        eventually(lambda: _state(ec2, orphan) in ("shutting-down", "terminated"), 35, "the orphan is terminated")
        said = (f"the aws backend has instance {orphan} (runner orphan-1) with this server's tags that the server "
                f"does not know: terminating it")
        assert said in server.log(), server.log()[-3000:]
        took = time.monotonic() - restarted
        # and the runner of the instance it knows comes back to it, then leaves idle: its instance terminates
        assert b.proc.wait(timeout=60) == 0, b.log()
        assert f"EC2: instance {b.id} is " in b.log() and _state(ec2, b.id) in ("shutting-down", "terminated")
        eventually(lambda: aws_instances() == 0, 30, "no aws instance")
        rows = {i["instance_id"]: i for i in api("/api/instances", all="true")}
        assert set(rows) == {a.id, b.id, orphan} and {r["status"] for r in rows.values()} == {"terminated"}, rows
        assert rows[orphan]["reason"].startswith("an orphan"), rows[orphan]

        # the secret: in no file of the server, no log line, no answer
        for path in [p for p in server.home.rglob("*") if p.is_file()] + [server.log_path]:
            data = path.read_bytes()
            assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, f"a key is in {path}"
        answers += [json.dumps(api(p)) for p in ("/api/backends", "/api/runners", "/api/limits")]
        answers.append(cli("status", "--all", "--json"))
        for text in answers:
            assert SECRET_KEY not in text and ACCESS_KEY not in text, text
        print(f"the test took {time.monotonic() - started:.0f} s; the orphan went {took:.1f} s after the restart")
    finally:
        if sampler is not None:
            sampler.stop()
        for m in machines:
            m.stop()
        server.stop()
        proxy.shutdown()
        proxy.server_close()
        shutil.rmtree(disk, ignore_errors=True)


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
