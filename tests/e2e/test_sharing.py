"""A scheduler that shares machines (issue 14, point 3): several jobs run on one runner at once while its CPUs,
memory and GPUs allow; a GPU is never given to two jobs; a job that does not fit now waits, saying so, and
gets what the others free."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.e2e.conftest import BIN, add_runner
from tests.unit.test_runner_resources import NVIDIA_SMI_V100_X2


def test_jobs_share_a_runner_and_never_a_gpu(server, project, tmp_path, shared):
    url, client = server
    release = shared / "release"
    root = project(f"""\
    workflows:
      - name: gpu
        commands:
          - echo "gpus=$CUDA_VISIBLE_DEVICES"
          - while [ ! -f {release} ]; do sleep 0.1; done
        resources:
          v100/gpu: 1
      - name: cpu
        commands:
          - echo "gpus=[$CUDA_VISIBLE_DEVICES]"
    """)
    inventory = tmp_path / "nvidia-smi.xml"  # a captured inventory: two V100s (DSTACK_GPU_INVENTORY)
    inventory.write_text(NVIDIA_SMI_V100_X2)
    issued = add_runner(client, root, "--name", "two-gpus")
    runner = subprocess.Popen([str(BIN / "dstack-runner"), "start", "--server", url, "--no-docker",
                               "--workdir", str(tmp_path / "runner")],
                              env={**os.environ, "DSTACK_TOKEN": issued["token"], "DSTACK_GPU_INVENTORY": str(inventory)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not json.loads(client("runners", "--json", cwd=root, check=True).stdout):
            assert time.monotonic() < deadline and runner.poll() is None, "the runner did not register"
            time.sleep(0.2)
        names = []
        for _ in range(3):
            client("run", "gpu", "-d", cwd=root, check=True)
            names.append(client.runs(root)[0]["run_name"])
        first, second, third = names
        client.wait_status(root, first, {"RUNNING"})
        client.wait_status(root, second, {"RUNNING"})
        time.sleep(1.5)  # the third has had time to be taken, if the scheduler were to give it a GPU taken
        assert client.run_info(root, third)["status"] == "SUBMITTED"
        listed = json.loads(client("runners", "--json", cwd=root, check=True).stdout)[0]
        assert sorted(listed["jobs"]) == sorted(client.run_info(root, n)["jobs"][0]["job_id"] for n in names[:2])
        assert listed["free"]["gpus"] == [] and listed["status"] == "BUSY"
        # a job without GPUs fits beside them (2 CPUs are taken of the machine's): it sees no GPU
        if len(os.sched_getaffinity(0)) > 2:
            assert "gpus=[]" in client("run", "cpu", cwd=root, check=True).stdout
        seen = {n: client("logs", n, cwd=root, check=True).stdout.strip() for n in names[:2]}
        assert sorted(seen.values()) == ["gpus=0", "gpus=1"], seen
        release.touch()
        for n in names[:2]:
            assert client.wait_status(root, n, {"DONE", "FAILED"}, timeout=60)["status"] == "DONE"
        # the third is taken as soon as a GPU is free, not when the runner's long poll for a job times out
        assert client.wait_status(root, third, {"RUNNING", "DONE"}, timeout=5)["status"] in ("RUNNING", "DONE")
        assert client.wait_status(root, third, {"DONE", "FAILED"}, timeout=60)["status"] == "DONE"
        assert client("logs", third, cwd=root, check=True).stdout.strip() in ("gpus=0", "gpus=1")
        assert json.loads(client("runners", "--json", cwd=root, check=True).stdout)[0]["status"] == "READY"
    finally:
        runner.terminate()
        try:
            runner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            runner.kill()
