"""The `slurm` backend end to end: Debian's Slurm (tests/slurm.py: munged, slurmctld, slurmd n1 and n2 on this
machine), a real server, and the CLI.

What it shows: `backends add slurm` sees the partition's nodes; a queued job becomes a batch job whose runner
installs the server's dstack from its wheels into the backend's folder (once: later allocations reuse it) and runs
the job with an artifact; a 2-node run is one allocation of n1 and n2 whose jobs reach each other; a job whose
allocation pends on Resources says so, and `dstack stop` cancels that Slurm job; a running job stopped ends its
allocation; no Slurm job of ours is left after the idle timeout; `backends remove` removes the backend's folder."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

from tests.dstack_server import Server
from tests.e2e.conftest import Dstack
from tests.e2e.test_multinode import PAIR

WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - mkdir -p out && echo made > out/result.txt
    artifacts: [out]
  - name: pair
    nodes: 2
    commands:
      - echo "rank=$JOB_RANK"
      - python3 pair.py
  - name: long
    commands:
      - echo started
      - sleep 300
"""


def _eventually(condition, within: float, what, every: float = 0.3):
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within} s: {what() if callable(what) else what}"
        time.sleep(every)


@pytest.fixture
def cluster_dir():
    d = Path(f"/tmp/dstack-slurm-{uuid.uuid4().hex[:8]}")  # the cluster's "shared filesystem": this machine's
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ours(slurm) -> list[str]:
    """Our Slurm jobs alive: `id|state|reason|name`."""
    out = slurm.run("squeue", "-h", "-o", "%i|%T|%r|%j").stdout
    return [line for line in out.splitlines() if "|dstack-" in line]


def test_slurm_backend_end_to_end(tmp_path, slurm, cluster_dir):
    server = Server(tmp_path / "home")
    d = Dstack(tmp_path / "client")
    d.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
    proj = tmp_path / "proj"
    (proj / ".dstack").mkdir(parents=True)
    (proj / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    (proj / "pair.py").write_text(PAIR)
    try:
        bad = d("backends", "add", "slurm", "--set", "partition=nosuch", "--set", f"dir={cluster_dir}", cwd=proj)
        assert bad.returncode != 0 and "nosuch" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        added = d("backends", "add", "slurm", "--set", f"partition={slurm.partition}", "--set", f"dir={cluster_dir}",
                  cwd=proj, check=True).stdout
        assert "slurm-wlm 22" in added and "partition debug: 2 nodes of 2 CPUs" in added, added

        # a job end to end, with an artifact
        made = d("run", "make", cwd=proj, timeout=180)
        assert made.returncode == 0 and "DONE" in made.stderr, made.stdout + made.stderr + server.log_text()
        assert "started slurm runner" in server.log_text() and "slurm: job " in server.log_text()
        assert (cluster_dir / "venv" / "bin" / "dstack-runner").exists()
        venv_made = (cluster_dir / "venv" / "dstack-wheel").stat().st_mtime

        # after its idle timeout (a few seconds on Slurm) the runner exits, and its allocation ends
        _eventually(lambda: not _ours(slurm), 60, lambda: _ours(slurm))
        _eventually(lambda: json.loads(d("backends", "--json", cwd=proj, check=True).stdout)[-1]["instances"] == 0,
                    30, "the instance is still counted")

        # two nodes, one allocation, jobs that reach each other
        pair = d("run", "pair", cwd=proj, timeout=180)
        assert pair.returncode == 0, pair.stdout + pair.stderr + server.log_text()
        assert "master got: hello from rank 1" in pair.stdout and "worker got: hello from rank 0" in pair.stdout
        assert re.search(r"slurm: job \d+ for runners \S+, \S+ ", server.log_text()), server.log_text()
        assert (cluster_dir / "venv" / "dstack-wheel").stat().st_mtime == venv_made  # installed once

        # a running job stopped: its allocation ends (the idle runner exits)
        long = json.loads(d("run", "long", "--json", cwd=proj, check=True).stdout)["run_name"]
        d.wait_status(proj, long, {"RUNNING"}, timeout=120)
        d("stop", long, cwd=proj, check=True)
        _eventually(lambda: not _ours(slurm), 60, lambda: _ours(slurm))

        # the cluster full: the job says why it waits (Slurm's reason), and stopping it cancels its Slurm job
        blocker = slurm.run("sbatch", "--parsable", "-N2", "-c2", "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
        waiting = json.loads(d("run", "make", "--json", cwd=proj, check=True).stdout)["run_name"]

        def reason() -> str:
            return d.run_info(proj, waiting)["jobs"][0].get("reason") or ""

        _eventually(lambda: "Resources" in reason(), 60, reason)
        assert "provisioning slurm" in reason(), reason()
        assert len(_ours(slurm)) == 1 and "PENDING" in _ours(slurm)[0]
        d("stop", waiting, cwd=proj, check=True)
        _eventually(lambda: not _ours(slurm), 30, lambda: _ours(slurm))
        slurm.run("scancel", blocker)

        # removed: its folder goes from the shared filesystem
        assert d("backends", "remove", "slurm", cwd=proj).returncode == 0
        _eventually(lambda: not cluster_dir.exists(), 60, lambda: list(cluster_dir.iterdir()))
        assert not _ours(slurm)
    finally:
        server.stop()
