"""The `torchrun` provider: a 2-node run whose jobs start torchrun with the rendezvous set from the master's
address. With torch importable where the jobs run, a real `torch.distributed` all-reduce on CPU (gloo); without it
(this machine's usual case: the jobs run the host's Python), each node starts the script once with the environment
torchrun would give it, and the two exchange over TCP. The test says which ran."""

from __future__ import annotations

import subprocess

from dstack.providers.torchrun import TorchrunProvider, TorchrunSpec
from tests.e2e.test_multinode import PAIR

ALL_REDUCE = """\
import os
try:
    import torch
    import torch.distributed as dist
except ImportError:
    torch = None
if torch is not None and os.environ.get("LOCAL_WORLD_SIZE") != "1" or os.environ.get("TORCHELASTIC_RUN_ID"):
    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    print("all-reduce:", t.item(), "ranks:", dist.get_world_size(), flush=True)
else:
    exec(open("pair.py").read())
"""


def _torch_on_host() -> bool:
    return subprocess.run(["python3", "-c", "import torch"], capture_output=True).returncode == 0


def test_torchrun_on_two_nodes(dstack, project):
    root = project("""\
    workflows:
      - name: ddp
        provider: torchrun
        file: train.py
        nodes: 2
    """)
    (root / "train.py").write_text(ALL_REDUCE)
    (root / "pair.py").write_text(PAIR)
    r = dstack("run", "ddp", cwd=root, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    if _torch_on_host():
        print("ran: torch.distributed all-reduce (gloo) over torchrun")
        assert "all-reduce: 3.0 ranks: 2" in r.stdout, r.stdout
    else:
        print("ran: plain Python TCP exchange (no torch on the host: torchrun's environment, one process a node)")
        assert "master got: hello from rank 1" in r.stdout and "worker got: hello from rank 0" in r.stdout, r.stdout
        assert "torchrun is not installed" in r.stdout + r.stderr


def test_torchrun_jobs():
    spec = TorchrunSpec.model_validate({"name": "d", "script": "t.py", "args": "--lr 0.1", "nproc_per_node": "gpu"})
    jobs = TorchrunProvider().create_jobs(spec, {})
    assert [j.rank for j in jobs] == [0, 1] and all(j.nodes == 2 for j in jobs)
    line = jobs[0].commands[-1]
    assert "exec torchrun --nnodes=\"$WORLD_SIZE\" --node_rank=\"$NODE_RANK\" --master_addr=\"$MASTER_ADDR\"" in line
    assert "--nproc_per_node=gpu t.py --lr 0.1" in line
    import pytest

    with pytest.raises(ValueError, match="nproc_per_node is a number"):
        TorchrunSpec.model_validate({"name": "d", "file": "t.py", "nproc_per_node": 0})
